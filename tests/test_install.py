"""A non-editable install works from anywhere: the shipped meshes and the embedded model are package data."""
import os
import shutil
import subprocess
import sys

from conftest import ROOT


def test_wheel_install_runs_shipped_mesh_and_model(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", "bench_out"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(wheels), str(src)], check=True, capture_output=True)
    target = tmp_path / "site"
    wheel, = wheels.glob("jaxpar-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    env = dict(os.environ, PYTHONPATH=str(target))
    r = subprocess.run([sys.executable, "-m", "jaxpar.generate", "--fake-devices", "8", "--mesh", "tp4",
                        "--prompt", "123+456="], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "579\n"
    r = subprocess.run([sys.executable, "-m", "jaxpar.plan", "--model", "llama3-70b", "--hardware", "tpu-v5p",
                        "--json"], capture_output=True, text=True, cwd=tmp_path, env=env)  # package data
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-c", "import jaxpar; print(jaxpar.__file__)"], capture_output=True,
                       text=True, cwd=tmp_path, env=env)
    assert r.stdout.startswith(str(target))


def test_fake_devices_from_python_in_a_fresh_process(tmp_path):
    """jaxpar.load(fake_devices=N) sets up N CPU devices when JAX has not started (even when it is already
    imported, as in a notebook), and a shipped mesh name works from a directory other than the repository."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}  # not conftest's 8
    env["PYTHONPATH"] = ROOT
    code = ("import jax, jaxpar\n"
            "eng = jaxpar.load(mesh='tp4', fake_devices=4)\n"
            "print(jax.device_count(), jax.devices()[0].platform, eng.mesh.size, eng.generate(['123+456='])[0])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "4 cpu 4 579\n"
