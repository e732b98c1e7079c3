"""Untrusted files: output paths cannot leave the output folder; loading a model never runs code from its files.

Evil paths tried (counted in the module constants): every one is a ConfigError naming the field, raised before
anything is written, and nothing appears outside the output folder.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import pytest
import yaml

from pocketlm.config import ConfigError
from pocketlm.config_pipeline import load_pipeline_config
from pocketlm.core.paths import confined

SRC = Path(__file__).resolve().parents[2] / "src" / "pocketlm"

# (value, what makes it evil); "link" is a symlink inside the output folder to a folder outside it
EVIL = [
    ("../x", "climbs out"), ("a/../../x", "climbs out"), ("..", "climbs out"), ("./a/./../../x", "climbs out"),
    ("/etc/x", "absolute"), ("~/x", "absolute"), ("/", "absolute"), ("", "empty"),
    ("link/x", "symlink"), ("link", "symlink"), ("sub/link2/x", "symlink"), ("loop/x", "symlink loop"),
]
FINE = ["x", "a/b/c.json", "a/../b", "./x", "sub/x"]
NAME_FIELDS = {  # pipeline result names (they become file names, e.g. audit/<name>.generations.jsonl)
    "eval.perplexity.0.name": {"eval": {"perplexity": [{"name": None}]}},
    "eval.rouge.0.name": {"eval": {"rouge": [{"name": None, "data": "s.jsonl"}]}},
    "audit.bias.0.name": {"audit": {"bias": [{"suite": "crows_pairs", "data": "c.csv", "name": None}]}},
    "audit.toxicity.0.name": {"audit": {"toxicity": [{"suite": "file", "data": "p.jsonl", "name": None}]}},
}
EVIL_NAMES = ["../x", "a/../../x", "/etc/x", "x/../../y", "..\\x"]


@pytest.fixture()
def out(tmp_path) -> Path:
    """An output folder holding symlinks that lead out of it (and one that loops), and an empty folder outside."""
    root, outside = tmp_path / "out", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "sub" / "link2").symlink_to("../../outside", target_is_directory=True)
    (root / "loop").symlink_to(root / "loop")
    return root


@pytest.mark.parametrize("value, why", EVIL)
def test_evil_paths_are_refused_naming_the_field(out, value, why):
    with pytest.raises(ConfigError, match=r"^some\.field: ") as e:
        confined(out, value, "some.field")
    assert ("output folder" in str(e.value)) and (why != "symlink" or "symlink" in str(e.value))
    assert not any((out.parent / "outside").iterdir())


@pytest.mark.parametrize("value", FINE)
def test_paths_inside_the_folder_are_kept(out, value):
    assert confined(out, value, "f") == out / value


@pytest.mark.parametrize("field", NAME_FIELDS)
@pytest.mark.parametrize("value", EVIL_NAMES)
def test_result_names_cannot_be_paths(tmp_path, field, value):
    tree = json.loads(json.dumps(NAME_FIELDS[field]))
    section, kind = field.split(".")[:2]
    tree[section][kind][0]["name"] = value
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_pipeline_config(path)


def test_a_stage_record_cannot_point_out_of_the_folder(out):
    """A stage record is a file in the output folder: a `*_dir` fact leading out of it is refused, not followed."""
    from pocketlm.pipeline import STAGE_SCHEMA, _stored

    for value in ("../outside", "/etc", "link"):
        rec = out / "stages" / "distill.json"
        rec.parent.mkdir(exist_ok=True)
        rec.write_text(json.dumps({"schema": STAGE_SCHEMA, "key": "k", "facts": {"student_dir": value}}))
        with pytest.raises(ConfigError, match=r"distill\.json facts\.student_dir"):
            _stored(rec, "k", out)


def test_a_stage_record_whose_entries_cannot_be_read_back_is_redone(out):
    """A record with the right key but entries of another shape is not trusted: the stage runs again (a None from
    `_stored`), where reading it back would crash the run."""
    from pocketlm.pipeline import STAGE_SCHEMA, _stored

    rec = out / "stages" / "perplexity.json"
    rec.parent.mkdir(exist_ok=True)
    good = {"schema": STAGE_SCHEMA, "key": "k", "facts": {}, "wall_time_s": 1.0, "entries": []}
    rec.write_text(json.dumps(good))
    assert _stored(rec, "k", out) == good
    for entries in ([{"role": "student"}], [{"role": "student", "entry": "x", "results": 3}], "not a list"):
        rec.write_text(json.dumps({**good, "entries": entries}))
        assert _stored(rec, "k", out) is None, entries
    rec.write_text(json.dumps({**good, "wall_time_s": "soon"}))
    assert _stored(rec, "k", out) is None


def test_runs_refuse_an_output_folder_whose_subfolders_lead_out(tmp_path, teacher_dir, corpus_file):
    """distill (checkpoints), the pipeline (stages) and VLM training (model): refused before any work."""
    from pocketlm.config import DistillConfig
    from pocketlm.distill.run import run_distill
    from pocketlm.pipeline import run_pipeline
    from pocketlm.vlm.config import VLMConfig
    from pocketlm.vlm.train import run_train

    outside = tmp_path / "outside"
    outside.mkdir()
    cases = [
        ("checkpoints", lambda o: run_distill(DistillConfig(teacher=str(teacher_dir), output_dir=str(o),
                                                            data={"source": str(corpus_file)}), progress=False)),
        ("stages", lambda o: run_pipeline(load_pipeline_config(None, [f"teacher={teacher_dir}", f"output_dir={o}"]),
                                          progress=False)),
        ("model", lambda o: run_train(VLMConfig(output_dir=str(o)))),
    ]
    for name, run in cases:
        o = tmp_path / name
        o.mkdir()
        (o / name).symlink_to(outside, target_is_directory=True)
        with pytest.raises(ConfigError, match=rf"output_dir \({name}\).*leads out of the output folder"):
            run(o)
        assert not any(outside.iterdir()), f"{name}: something was written outside"
        assert sorted(p.name for p in o.iterdir()) == [name]


# ---------------------------------------------------------------------------------------------- loading code
class _Payload:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


def test_a_pickled_checkpoint_is_never_unpickled(tmp_path, teacher_dir):
    """A model folder whose weights are a pickle that would run code: loading refuses it and runs nothing."""
    from pocketlm.models.load import ModelLoadError, load_model

    folder, sentinel = tmp_path / "evil", tmp_path / "PWNED"
    folder.mkdir()
    for f in teacher_dir.iterdir():
        if f.name != "model.safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    with open(folder / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"model.embed_tokens.weight": _Payload(sentinel)}, fh)
    with pytest.raises(ModelLoadError, match="[Ww]eights only load failed"), pytest.warns(UserWarning, match="pickle"):
        load_model(folder)
    assert not sentinel.exists()


def test_remote_code_is_not_run_without_the_flag(tmp_path, teacher_dir):
    """A model folder that names its own Python code (auto_map): without trust_remote_code it is not imported."""
    from pocketlm.models.load import ModelLoadError, load_model

    folder, sentinel = tmp_path / "remote", tmp_path / "PWNED"
    folder.mkdir()
    for f in teacher_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    cfg["model_type"] = "evil_remote"
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(sentinel)!r}).touch()\n")
    with pytest.raises(ModelLoadError, match="contains custom code.*--trust-remote-code"):
        load_model(folder)
    assert not sentinel.exists()


def test_remote_code_runs_only_when_the_user_passes_the_flag(monkeypatch, tmp_path, teacher_dir):
    """`pocketlm --trust-remote-code CMD` (or POCKETLM_TRUST_REMOTE_CODE=1) is the only way to turn it on; the
    flag reaches the loader as an argument (no process-wide state); an explicit False from code still wins."""
    import transformers
    from typer.testing import CliRunner

    from pocketlm.cli import app
    from pocketlm.models import load

    seen: list[bool] = []

    def fake(path, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    monkeypatch.delenv(load.REMOTE_CODE_ENV, raising=False)
    text = tmp_path / "docs.txt"
    text.write_text("one document here\n\nand another one\n")
    for flag in ([], ["--trust-remote-code"]):
        result = CliRunner().invoke(app, [*flag, "eval", "perplexity", "--model", str(teacher_dir), "--data", str(text),
                                          "--out", str(tmp_path / "r.json")])
        assert result.exit_code != 0 and "stop here" in result.output
    assert seen == [False, True]
    assert load.REMOTE_CODE_ENV not in os.environ  # the flag is passed to the loader as an argument, not via the env
    monkeypatch.setenv(load.REMOTE_CODE_ENV, "1")
    assert load.remote_code_allowed(None) and not load.remote_code_allowed(False)
    monkeypatch.delenv(load.REMOTE_CODE_ENV)
    assert not load.remote_code_allowed(None)


def test_source_never_unpickles_or_evals():
    """No pickle, no torch.load without weights_only=True, no eval/exec, trust_remote_code only from the option."""
    bad = []
    for f in sorted(SRC.rglob("*.py")):
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#")[0]
            where = f"{f.relative_to(SRC)}:{i}: {line.strip()}"
            if re.search(r"\bimport (c?pickle|dill|marshal)\b|\bpickle\.load|\bjoblib\.load", code):
                bad.append(where)
            if "torch.load(" in code and "weights_only=True" not in code:
                bad.append(where)
            if re.search(r"(?<![\w.])(eval|exec)\(", code):
                bad.append(where)
            if re.search(r"trust_remote_code\s*=\s*True", code):
                bad.append(where)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("command", ["size", "attention", "vlm caption"])
def test_the_flag_reaches_the_loader_of_every_command_that_loads(monkeypatch, tmp_path, teacher_dir, command):
    """`--trust-remote-code` is an argument now, not process state: each command must pass it on itself (the size
    measurement and the VLM commands once dropped it)."""
    import transformers
    from PIL import Image
    from typer.testing import CliRunner

    from pocketlm.cli import app
    from pocketlm.models import load
    from pocketlm.models.vision import VisionLanguageModel

    seen: list = []

    def fake(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    monkeypatch.setattr(VisionLanguageModel, "load", classmethod(lambda cls, *a, **k: fake(*a, **k)))
    monkeypatch.delenv(load.REMOTE_CODE_ENV, raising=False)
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    argv = {"size": ["size", str(teacher_dir), "--measure", "--out", str(tmp_path / "s.json")],
            "attention": ["attention", "--model", str(teacher_dir), "--text", "a b c", "--out", str(tmp_path / "a")],
            "vlm caption": ["vlm", "caption", str(image), "--model", str(tmp_path), "--out", str(tmp_path / "c.json")],
            }[command]
    for flag in ([], ["--trust-remote-code"]):
        result = CliRunner().invoke(app, [*flag, *argv])
        assert result.exit_code != 0 and "stop here" in result.output, result.output
    assert [bool(s) for s in seen] == [False, True]
