"""Every bad input: the API raises a ValueError subclass; the CLI prints one `error: ...` line, exits 2."""
import math
import os
import subprocess
import sys

import pytest
import yaml

import jaxpar
from conftest import ROOT, mesh_path
from jaxpar.tools import cli

GOOD_MODEL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32)


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(p)


MESH_CASES = {  # name: (file content or None for a missing file, expected message fragments)
    "missing": (None, ["mesh file not found", "shipped meshes", "dp2_tp4, dp8", "tp4, tp8"]),
    "unparseable": ("axes: [tensor: 2\n", ["not valid YAML"]),
    "unknown_key": ({"axes": {"tensor": 2}, "layout": "x"}, ["unknown key(s) layout"]),
    "unknown_axis": ({"axes": {"pipeline": 2}}, ["axes", "unknown axis 'pipeline'"]),
    "too_many_devices": ({"axes": {"data": 2, "tensor": 8}}, ["data=2 x tensor=8", "multiply to 16", "only 8",
                                                              "--fake-devices N", "fake_devices=N"]),
    "two_minus_one": ({"axes": {"data": -1, "tensor": -1}}, ["only one axis may be -1", "data, tensor"]),
    "minus_one_not_dividing": ({"axes": {"data": -1, "tensor": 3}}, ["multiply to 3", "8 devices"]),
    "bad_size": ({"axes": {"tensor": 0}}, ["axes.tensor", "got 0"]),
    "bad_rule": ({"axes": {"tensor": 2}, "rules": {"vocab": "tensr"}}, ["rules.vocab", "'tensr'"]),
    "bad_attention": ({"axes": {"tensor": 2}, "attention": "flash"}, ["attention must be one of", "'flash'"]),
}

LAYOUT_CASES = {  # model overrides on top of GOOD_MODEL, mesh, expected fragments
    "heads": (dict(num_attention_heads=6, num_key_value_heads=6, head_dim=16), "tp4",
              ["tensor=4", "num_attention_heads=6", "not divisible by 4"]),
    "kv_heads": (dict(num_attention_heads=6, num_key_value_heads=3, head_dim=16), "tp2",
                 ["tensor=2", "num_key_value_heads=3", "2"]),
    "vocab": (dict(vocab_size=66), "tp4", ["tensor=4", "vocab_size=66", "not divisible by 4"]),
}

CONFIG_CASES = {
    "unknown_field": (dict(GOOD_MODEL, n_layers=3), ["unknown field(s) n_layers"]),
    "inconsistent_heads": (dict(GOOD_MODEL, num_key_value_heads=3), ["num_attention_heads=4",
                                                                      "num_key_value_heads=3"]),
    "negative": (dict(GOOD_MODEL, hidden_size=-32), ["hidden_size", "-32"]),
    "bad_rope": (dict(GOOD_MODEL, rope_scaling={"rope_type": "longrope", "factor": 2.0}), ["rope_scaling", "'longrope'"]),
    "yarn_without_original_context": (dict(GOOD_MODEL, rope_scaling={"rope_type": "yarn", "factor": 2.0}),
                                      ["rope_scaling.original_max_position_embeddings", "yarn"]),
    "top_k_over_experts": (dict(GOOD_MODEL, num_local_experts=4, num_experts_per_tok=5),
                           ["num_experts_per_tok=5", "num_local_experts=4"]),
    "top_k_without_experts": (dict(GOOD_MODEL, num_experts_per_tok=2), ["num_experts_per_tok=2",
                                                                         "num_local_experts is 0"]),
    "moe_width_without_experts": (dict(GOOD_MODEL, moe_intermediate_size=32), ["moe_intermediate_size=32",
                                                                                "num_local_experts is 0"]),
    "aliases_disagree": (dict(GOOD_MODEL, num_local_experts=4, num_experts=8, num_experts_per_tok=2),
                         ["num_experts", "num_local_experts", "disagree"]),
}

GEN_CASES = {  # generate options, expected fragments
    "max_new_tokens": (dict(max_new_tokens=0), ["--max-new-tokens", "got 0"]),
    "temperature_negative": (dict(temperature=-0.5), ["--temperature", "-0.5"]),
    "temperature_nan": (dict(temperature=math.nan), ["--temperature", "nan"]),
    "top_p_zero": (dict(top_p=0.0), ["--top-p", "(0, 1]", "0.0"]),
    "top_p_big": (dict(top_p=1.5), ["--top-p", "1.5"]),
    "top_k": (dict(top_k=-1), ["--top-k", "-1"]),
}

CLI_FLAG = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_p": "--top-p",
            "top_k": "--top-k"}


def run_cli(argv, capsys):
    from jaxpar.generate import main
    with pytest.raises(SystemExit) as e:
        cli.run(main, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def check(msg, fragments):
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"


@pytest.mark.parametrize("case", MESH_CASES)
def test_bad_mesh_files(case, tmp_path, capsys):
    data, frags = MESH_CASES[case]
    path = str(tmp_path / "absent.yaml") if data is None else write(tmp_path, f"{case}.yaml", data)
    with pytest.raises(jaxpar.JaxparError) as e:
        jaxpar.load(mesh=path)
    assert isinstance(e.value, ValueError)
    check(str(e.value), frags + [path])
    check(run_cli(["--mesh", path, "--prompt", "1+1="], capsys), frags + [path])


@pytest.mark.parametrize("case", LAYOUT_CASES)
def test_layouts_the_model_cannot_take(case, tmp_path, capsys):
    over, mesh, frags = LAYOUT_CASES[case]
    model = write(tmp_path, "model.yaml", dict(GOOD_MODEL, **over))
    with pytest.raises(jaxpar.JaxparError) as e:
        jaxpar.load(mesh=mesh_path(mesh), model=model)
    check(str(e.value), frags + [mesh_path(mesh)])
    check(run_cli(["--mesh", mesh_path(mesh), "--model", model, "--prompt", "1+1="], capsys), frags)


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_model_configs(case, tmp_path, capsys):
    data, frags = CONFIG_CASES[case]
    model = write(tmp_path, "model.yaml", data)
    with pytest.raises(jaxpar.JaxparError) as e:
        jaxpar.load(mesh=mesh_path("tp2"), model=model)
    check(str(e.value), frags + [model])
    check(run_cli(["--mesh", mesh_path("tp2"), "--model", model, "--prompt", "1+1="], capsys), frags + [model])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "small.yaml"
    path.write_text(yaml.safe_dump(GOOD_MODEL))
    return str(path), jaxpar.load(mesh=mesh_path("tp2"), model=str(path))


@pytest.mark.parametrize("case", GEN_CASES)
def test_bad_generation_options(case, small, capsys):
    model, eng = small
    kw, frags = GEN_CASES[case]
    with pytest.raises(jaxpar.JaxparError) as e:
        eng.generate_tokens([[1, 2, 3]], **kw)
    check(str(e.value), frags)
    (name, value), = kw.items()
    check(run_cli(["--mesh", mesh_path("tp2"), "--model", model, "--prompt", "1+1=", CLI_FLAG[name], str(value)],
                  capsys), frags)


def test_prompt_longer_than_context(small, capsys):
    model, eng = small
    with pytest.raises(jaxpar.JaxparError, match="33 tokens, longer than the context window of 32"):
        eng.generate_tokens([[1] * 33])
    with pytest.raises(jaxpar.JaxparError, match="context window of 32"):
        eng.logits([[1] * 33])
    check(run_cli(["--mesh", mesh_path("tp2"), "--prompt", "x" * 70], capsys),  # tiny-add: 64 positions
          ["71 tokens", "context window of 64"])


def test_missing_checkpoint(tmp_path, capsys):
    d = str(tmp_path / "nothing")
    with pytest.raises(jaxpar.JaxparError, match="checkpoint directory not found"):
        jaxpar.load(mesh=mesh_path("tp2"), checkpoint=d)
    check(run_cli(["--mesh", mesh_path("tp2"), "--checkpoint", d, "--prompt", "1+1="], capsys),
          [d, "checkpoint directory not found"])
    f = write(tmp_path, "config.yaml", GOOD_MODEL)  # a file where a directory belongs: said so, not "not found"
    with pytest.raises(jaxpar.JaxparError, match="is a file, not a checkpoint directory"):
        jaxpar.load(mesh=mesh_path("tp2"), checkpoint=f)
    check(run_cli(["--mesh", mesh_path("tp2"), "--checkpoint", f, "--prompt", "1+1="], capsys),
          [f, "is a file, not a checkpoint directory", "config.yaml and params/"])
    check(run_cli(["--mesh", mesh_path("tp2"), "--hf", f, "--prompt", "1+1="], capsys),
          [f, "is a file, not a Hugging Face model directory"])


def test_unknown_mesh_name_lists_the_shipped_ones(capsys):
    from jaxpar.layout.mesh_file import MESHES_DIR, shipped_meshes
    names = shipped_meshes()
    assert names == sorted(f[:-5] for f in os.listdir(MESHES_DIR) if f.endswith(".yaml")) and "tp4" in names
    msg = run_cli(["--mesh", "tp3", "--prompt", "1+1="], capsys)
    check(msg, ["tp3: mesh file not found", "usable by name from any directory", ", ".join(names)])


def test_fake_devices_from_python():
    """This process's JAX has started with 8 devices (conftest): the same count is accepted, any other
    refused with the counts and what to do; a fresh process is tested in test_install.py."""
    from jaxpar.api import use_fake_devices
    use_fake_devices(8)
    with pytest.raises(jaxpar.JaxparError) as e:
        jaxpar.load(mesh="tp4", fake_devices=4)
    check(str(e.value), ["fake_devices=4", "already started with 8 cpu device(s)", "before anything else uses JAX"])
    for bad in (0, -2, 2.0, True):
        with pytest.raises(jaxpar.JaxparError, match="fake_devices must be an integer >= 1"):
            jaxpar.load(mesh="tp4", fake_devices=bad)


def test_prompts_file_errors(tmp_path, capsys):
    empty = write(tmp_path, "empty.txt", "\n  \n")
    check(run_cli(["--mesh", "single", "--prompts-file", empty], capsys), [empty, "no prompts"])
    check(run_cli(["--mesh", "single", "--prompt", "1+1=", "--prompts-file", empty], capsys),
          ["--prompts-file", "not allowed with", "--prompt"])
    check(run_cli(["--mesh", "single"], capsys), ["one of the arguments --prompt --prompts-file is required"])
    check(run_cli(["--mesh", "single", "--prompts-file", str(tmp_path / "absent.txt")], capsys),
          [str(tmp_path / "absent.txt"), "No such file"])
    for lines, frags in ((['{"prompt": "1+1="}', "{oops"], ["line 2", "not valid JSON"]),
                         (['["1+1="]'], ["line 1", 'a "prompt" string']),
                         (['{"prompt": "1+1=", "max_token": 3}'], ["line 1", "unknown key(s) max_token"]),
                         (['', '{"prompt": "1+1=", "max_tokens": 0}'], ["line 2", "max_tokens", "got 0"])):
        f = write(tmp_path, "bad.jsonl", "\n".join(lines) + "\n")
        check(run_cli(["--mesh", "single", "--prompts-file", f], capsys), [f] + frags)


def test_checkpoint_not_matching_config(tmp_path, capsys):
    from jaxpar.config import config_from_dict
    from jaxpar.engine import checkpoint as ckpt
    eng = jaxpar.load(mesh=mesh_path("tp2"), model=config_from_dict(GOOD_MODEL))
    d = str(tmp_path / "ck")
    ckpt.save(d, eng.config, eng.params)
    cfg = yaml.safe_load(open(os.path.join(d, "config.yaml")))
    cfg["vocab_size"] = 128
    yaml.safe_dump(cfg, open(os.path.join(d, "config.yaml"), "w"))
    frags = ["embed", "(64, 32)", "(128, 32)"]
    with pytest.raises(jaxpar.JaxparError) as e:
        jaxpar.load(mesh=mesh_path("tp2"), checkpoint=d)
    check(str(e.value), frags)
    check(run_cli(["--mesh", mesh_path("tp2"), "--checkpoint", d, "--prompt", "1+1="], capsys), frags)


def test_cli_end_to_end_error_has_no_traceback():
    r = subprocess.run([sys.executable, "-m", "jaxpar.inspect", "--fake-devices", "8", "--mesh", "tp16-missing.yaml"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    line, = r.stderr.strip().splitlines()
    assert line.startswith("error: tp16-missing.yaml: mesh file not found; the shipped meshes") and "tp4" in line


def test_readme_command_prints_579():
    r = subprocess.run([sys.executable, "-m", "jaxpar.generate", "--fake-devices", "8", "--mesh",
                        "meshes/dp2_tp4.yaml", "--prompt", "123+456="], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "579\n"


def test_more_bad_values_are_one_line_errors(small, tmp_path, capsys):
    model, eng = small
    with pytest.raises(jaxpar.JaxparError, match="--seed"):
        eng.generate_tokens([[1, 2]], seed=10 ** 30)
    check(run_cli(["--mesh", mesh_path("tp2"), "--model", model, "--prompt", "1", "--seed", str(10 ** 30)], capsys),
          ["--seed", str(10 ** 30)])
    # a top-k larger than the vocabulary keeps every token: the same draws as no top-k at all
    many = dict(max_new_tokens=8, temperature=1.0, seed=5, stop_at_eos=False)
    assert eng.generate_tokens([[1, 2]], top_k=10 ** 12, **many) == eng.generate_tokens([[1, 2]], top_k=0, **many)
    assert eng.generate_tokens([[1, 2]], top_k=1, **many) == eng.generate_tokens([[1, 2]], max_new_tokens=8,
                                                                                  stop_at_eos=False)  # top-1 = greedy
    # text needs the byte tokenizer's 259 ids; token ids still work
    check(run_cli(["--mesh", mesh_path("tp2"), "--model", model, "--prompt", "1+1="], capsys),
          ["vocab_size=64", "259"])
    with pytest.raises(jaxpar.JaxparError, match="prompt 1: token ids must be in \\[0, 64\\)"):
        eng.generate_tokens([[1, 2], [3, 64]])
    for bad in ({"axes": []}, {"axes": {"tensor": 2}, "rules": []}, {"capacity_factor": False}):
        with pytest.raises(jaxpar.JaxparError, match="bad.yaml"):
            jaxpar.load(mesh=write(tmp_path, "bad.yaml", bad))


def test_inspect_refuses_bad_sizes(capsys):
    from jaxpar.inspect import main
    for argv, frag in ((["--max-new-tokens", "-30"], "--max-new-tokens"), (["--prompt-len", "0"], "--prompt-len"),
                       (["--batch", "0"], "--batch")):
        with pytest.raises(SystemExit) as e:
            cli.run(main, ["--mesh", mesh_path("tp2")] + argv)
        assert e.value.code == 2
        assert frag in capsys.readouterr().err


@pytest.mark.parametrize("rules,frag", [({"batch": "tensor"}, "tensor would split both batch and heads"),
                                        ({"layers": "tensor"}, "tensor would split both layers and"),
                                        ({"kv_heads": "data"}, "data would split both batch and kv_heads")])
def test_rule_overrides_that_split_one_tensor_twice(rules, frag, tmp_path, capsys):
    path = write(tmp_path, "rules.yaml", {"axes": {"data": 2, "tensor": 4}, "rules": rules})
    with pytest.raises(jaxpar.JaxparError, match=frag):
        jaxpar.load(mesh=path)
    check(run_cli(["--mesh", path, "--prompt", "1+1="], capsys), [path, frag])


def test_the_reuse_check_reads_the_models_own_activations():
    """The tensors the check above covers are the ones the model pins (recorded from its `constrain` calls),
    not a hand-kept list: the mixture-of-experts hidden activation appears for a MoE model only."""
    from jaxpar.config import load_config
    from jaxpar.layout.plan import activation_names
    from jaxpar.layout.rules import LOGICAL_AXES
    dense, moe = activation_names(load_config("tiny-add")), activation_names(load_config("tiny-add-moe"))
    expert_hidden = ("batch", "seq", None, "mlp")
    assert expert_hidden in moe and expert_hidden not in dense
    for names in (("batch", "residual_seq", "embed"), ("batch", "seq", "kv_heads", "head_dim"),
                  ("batch", "seq", "vocab"), ("layers", "batch", "cache_seq", None, "kv_heads", "head_dim")):
        assert names in dense and names in moe
    assert {n for names in dense + moe for n in names} <= set(LOGICAL_AXES) | {None}


def test_unreadable_checkpoints(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "params").mkdir(parents=True)
    (empty / "config.yaml").write_text(yaml.safe_dump(GOOD_MODEL))
    with pytest.raises(jaxpar.JaxparError, match="empty"):
        jaxpar.load(mesh=mesh_path("tp2"), checkpoint=str(empty))
    check(run_cli(["--mesh", mesh_path("tp2"), "--checkpoint", str(empty), "--prompt", "1"], capsys), [str(empty)])


@pytest.mark.parametrize("tool", ["generate", "inspect", "plan", "convert", "tools.load_memory", "bench",
                                  "bench seq", "bench moe", "bench pp", "bench collectives", "bench attention",
                                  "bench continuous", "bench --vs-transformers"])
def test_help_is_whole_sentences_and_every_option_has_help(tool, monkeypatch):
    """--help: the description is whole (not a docstring's first line cut mid-sentence) and no option is
    left without a word of help. "bench X" is `python -m jaxpar.bench X`: the focused benchmark's parser."""
    import importlib

    class Parsed(Exception):
        pass

    def capture(self, argv=None, namespace=None):
        raise Parsed(self)

    monkeypatch.setattr(cli.Parser, "parse_args", capture)
    with pytest.raises(Parsed) as e:
        module, *argv = tool.split()
        importlib.import_module(f"jaxpar.{module}").main(argv)
    p = e.value.args[0]
    p.format_help()  # help text that argparse can format (a bare % in it cannot be)
    assert p.description[0].isupper() and p.description.endswith("."), p.description
    missing = [a.option_strings[0] for a in p._actions if not a.help]
    assert not missing, f"{tool}: options without help: {missing}"
