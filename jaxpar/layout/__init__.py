"""The layout: mesh files, the logical-axis table, and validation of a model against a mesh."""
