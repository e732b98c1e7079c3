"""What pocketlm reads back from its own outputs is checked, never trusted (issue #16, items 1, 4, 6 and 10).

A teacher-cache manifest whose shard names are paths, a checkpoint whose bytes changed after it was written, a
trainer_state.json with impossible fields, packed data blocks with a flipped bit, a JSON record that is not UTF-8:
each is refused by name (or, for our own derived data, named and rebuilt), and no file outside pocketlm's folders is
ever read as ours, trained on or deleted. Cases through the real CLI where the issue found them there.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from pocketlm.cli import app
from pocketlm.config import DistillConfig
from pocketlm.distill import cache as cache_mod
from pocketlm.distill.cache import CacheMismatchError, TeacherCache
from pocketlm.distill.checkpoint import list_checkpoints
from pocketlm.distill.run import run_distill
from pocketlm.core.integrity import sha256_file


def _config(teacher_dir, corpus_file, out: Path) -> DistillConfig:
    """4 steps of a 2-layer student of the 4-layer test teacher, checkpoints at steps 2 and 4."""
    return DistillConfig.model_validate({
        "teacher": str(teacher_dir),
        "data": {"source": str(corpus_file), "block_size": 16, "val_fraction": 0.15},
        "student": {"init": "teacher_layers", "num_layers": 2},
        "distill": {"mode": "cache", "loss": "forward_kl", "top_k": 8, "temperature": 2.0},
        "train": {"steps": 4, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "eval_every": 4, "save_every": 2},
        "output_dir": str(out),
    })


@pytest.fixture(scope="module")
def finished(tmp_path_factory, teacher_dir, corpus_file) -> Path:
    """A finished run: checkpoints step-000002 and step-000004, a teacher cache, packed data blocks."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run_distill(_config(teacher_dir, corpus_file, out), progress=False)
    return out


@pytest.fixture()
def run(tmp_path, finished, teacher_dir, corpus_file) -> Path:
    """A copy of the finished run, with its config at run.yaml (for `pocketlm distill run.yaml --resume`)."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    cfg = _config(teacher_dir, corpus_file, out)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return out


def _resume(run: Path):
    return CliRunner().invoke(app, ["distill", str(run.with_suffix(".yaml")), "--resume", "--quiet"])


def _refused(r, *patterns: str) -> str:
    """The CLI failed by name: exit 2, an `error:` line, no traceback, and each pattern in the message."""
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert "error:" in r.output and "Traceback" not in r.output, r.output
    for p in patterns:
        assert p in r.output, (p, r.output)
    return r.output


def _flip_middle(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


def _edit_json(p: Path, edit) -> None:
    obj = json.loads(p.read_text())
    edit(obj)
    p.write_text(json.dumps(obj))


# ---------------------------------------------------------------------------------------------- teacher cache
def _small_cache(path: Path, tokenizer) -> None:
    from conftest import make_teacher

    blocks = torch.randint(0, len(tokenizer), (10, 12), generator=torch.Generator().manual_seed(0))
    cache_mod.build_teacher_cache(make_teacher(len(tokenizer)), blocks, path, k=5, teacher_fingerprint="t",
                                  tokenizer_fingerprint="k", data_hash="d", batch_size=3, shard_blocks=4,
                                  progress=False)


# shard 0's recorded name, as an attacker or a careless edit would write it ({victim}: a user's file outside)
EVIL_SHARD_NAMES = ["{victim}", "../victim.safetensors", "../../victim.safetensors", "sub/shard-00000.safetensors",
                    "./shard-00000.safetensors", "shard-00001.safetensors", "shard-0.safetensors", "victim.safetensors",
                    "shard-00000.safetensors/..", ""]


@pytest.mark.parametrize("name", EVIL_SHARD_NAMES)
@pytest.mark.parametrize("recorded", ["the victim's checksum", "a wrong checksum"])
def test_cache_manifest_shard_names_must_be_our_own_names(tmp_path, tokenizer, name, recorded):
    """10 × 2 cases: shard 0 of a cache manifest names a path (absolute, climbing out, in a sub-folder), another
    shard's name or a name pocketlm never writes. With the victim's own checksum the old code trained on the
    victim; with a wrong one it deleted it ("damaged; rebuilding it"). Now opening the cache and rebuilding it both
    refuse the manifest by name and field, and the victim is untouched."""
    cache = tmp_path / "cache"
    _small_cache(cache, tokenizer)
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes((cache / "shard-00000.safetensors").read_bytes())  # a valid shard: the old code read it
    before = victim.read_bytes()
    value = name.format(victim=victim)
    sha = sha256_file(victim) if recorded.startswith("the victim") else "0" * 64

    def edit(m):
        m["shards"][0].update(file=value, sha256=sha)

    _edit_json(cache / "manifest.json", edit)
    pattern = r"manifest\.json.*shards\[0\]\.file"
    with pytest.raises(CacheMismatchError, match=pattern):
        TeacherCache.open(cache)
    with pytest.raises(CacheMismatchError, match=pattern):
        _small_cache(cache, tokenizer)
    assert victim.read_bytes() == before


def test_cache_shard_that_is_a_symlink_out_is_refused(tmp_path, tokenizer):
    """1 case: shard 0 replaced by a symlink to a user's file (with the right bytes, so its checksum matches):
    the old code read through it; now the cache is refused naming the link."""
    cache = tmp_path / "cache"
    _small_cache(cache, tokenizer)
    victim = tmp_path / "victim.safetensors"
    shard = cache / "shard-00000.safetensors"
    shutil.move(shard, victim)
    shard.symlink_to(victim)
    with pytest.raises(CacheMismatchError, match=r"shard-00000\.safetensors is a symlink"):
        TeacherCache.open(cache)
    assert victim.is_file()


@pytest.mark.parametrize("bad", [{"shards": "x"}, {"shards": [["shard-00000.safetensors"]]}, {"k": None}])
def test_cache_manifest_with_wrong_types_is_refused_by_name(tmp_path, tokenizer, bad):
    """3 cases: a manifest whose shards are not a list of records, or whose k is null, is refused naming the
    manifest (the old code raised TypeError / AttributeError tracebacks for the first two)."""
    cache = tmp_path / "cache"
    _small_cache(cache, tokenizer)
    _edit_json(cache / "manifest.json", lambda m: m.update(bad))
    with pytest.raises(CacheMismatchError, match=r"manifest\.json"):
        TeacherCache.open(cache)


def test_distill_never_deletes_a_file_the_manifest_names(run, tmp_path):
    """1 case, the issue's: through the CLI, the run's manifest names a user's file by absolute path with a wrong
    checksum. The old `distill --resume` deleted it; now it exits 2 naming the manifest, and the file stays."""
    victim = tmp_path / "precious.txt"
    victim.write_text("the user's work")
    _edit_json(run / "teacher_cache" / "manifest.json", lambda m: m["shards"][0].update(file=str(victim)))
    _refused(_resume(run), "manifest.json", "shards[0].file")
    assert victim.read_text() == "the user's work"


# ---------------------------------------------------------------------------------------------- damaged JSON
@pytest.mark.parametrize("where", ["teacher_cache/manifest.json", "checkpoints/step-000004/trainer_state.json"])
@pytest.mark.parametrize("content", [b"\xff\xfe{not utf-8", b'{"step": 4', b"[1, 2]"])
def test_damaged_json_record_is_named(run, where, content):
    """2 × 3 cases: a cache manifest or a trainer_state.json that is not UTF-8, not JSON, or not a JSON object.
    The old code said "'utf-8' codec can't decode ..." or "Expecting ',' delimiter" naming no file (or a traceback
    for a list); now the error names the file."""
    (run / where).write_bytes(content)
    _refused(_resume(run), Path(where).name)


# ---------------------------------------------------------------------------------------------- trainer_state
BAD_STATES = {
    "negative step": lambda s: s.update(step=-3),
    "step as text": lambda s: s.update(step="4"),
    "step as bool": lambda s: s.update(step=True),
    "step not the folder's": lambda s: s.update(step=3),
    "negative tokens_seen": lambda s: s.update(tokens_seen=-1),
    "history not a list": lambda s: s.update(history="x"),
    "no optimizer groups": lambda s: s.pop("optimizer_param_groups"),
    "scheduler not a record": lambda s: s.update(scheduler=[1]),
    "run not a record": lambda s: s.update(run=7),
}


@pytest.mark.parametrize("bad", BAD_STATES)
def test_impossible_trainer_state_is_refused_by_field(run, bad):
    """9 cases: trainer_state.json fields a resume cannot use. The old code resumed from step -3 and wrote
    `step--00003` folders, or failed with a bare KeyError / TypeError; now the file and the field are named and
    no checkpoint folder appears."""
    state = run / "checkpoints" / "step-000004" / "trainer_state.json"
    _edit_json(state, BAD_STATES[bad])
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    _refused(_resume(run), "step-000004/trainer_state.json")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


# ---------------------------------------------------------------------------------------------- checksums
def test_checkpoint_records_a_checksum_of_every_file(finished):
    """The checksums are recorded when each checkpoint is written, in trainer_state.json (written last)."""
    for _, ckpt in list_checkpoints(finished / "checkpoints"):
        sums = json.loads((ckpt / "trainer_state.json").read_text())["checksums"]
        files = {p.name for p in ckpt.iterdir()} - {"trainer_state.json"}
        assert set(sums) == files and {"model.safetensors", "optimizer.safetensors", "rng.safetensors"} <= files
        assert all(sums[f] == sha256_file(ckpt / f) for f in files)


@pytest.mark.parametrize("target", ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "config.json"])
def test_damaged_checkpoint_is_refused_naming_the_previous_good_one(run, target):
    """4 cases: one flipped bit in a file of the latest checkpoint (the issue's case: the old code resumed with the
    wrong weights, exit 0). The resume is refused naming the damaged file and offering step-000002."""
    _flip_middle(run / "checkpoints" / "step-000004" / target)
    out = _refused(_resume(run), f"step-000004/{target} is damaged (checksum mismatch)")
    assert "previous good checkpoint is " in out and "step-000002" in out


def test_damaged_checkpoint_with_no_good_one_before_it(run):
    """2 faults: both checkpoints damaged; the refusal says there is no good checkpoint to go back to."""
    for step in ("step-000002", "step-000004"):
        _flip_middle(run / "checkpoints" / step / "model.safetensors")
    _refused(_resume(run), "step-000004/model.safetensors is damaged", "no earlier good checkpoint")


def test_missing_checkpoint_file_and_symlinked_file_are_refused(run, finished, tmp_path):
    """2 faults: a recorded file removed from the latest checkpoint, and one replaced by a symlink to a user's
    copy of it (same bytes): the old code resumed from both; now each is refused by name."""
    ckpt = run / "checkpoints" / "step-000004"
    (ckpt / "rng.safetensors").unlink()
    _refused(_resume(run), "step-000004/rng.safetensors is missing")
    shutil.copy(finished / "checkpoints" / "step-000004" / "rng.safetensors", ckpt)
    victim = tmp_path / "model-copy.safetensors"
    shutil.move(ckpt / "model.safetensors", victim)
    (ckpt / "model.safetensors").symlink_to(victim)
    _refused(_resume(run), "model.safetensors is a symlink")
    assert victim.is_file()


def test_checksum_names_in_trainer_state_are_plain_names(run, tmp_path):
    """1 case: a checksums entry naming a path outside the checkpoint is refused by field, not read."""
    victim = tmp_path / "secret.bin"
    victim.write_bytes(b"x")

    def edit(s):
        s["checksums"][str(victim)] = "0" * 64

    _edit_json(run / "checkpoints" / "step-000004" / "trainer_state.json", edit)
    _refused(_resume(run), "trainer_state.json", "checksums")
    assert victim.read_bytes() == b"x"


# ---------------------------------------------------------------------------------------------- packed blocks
@pytest.mark.parametrize("damage", ["flip a bit", "truncate", "drop the checksum"])
def test_damaged_block_cache_is_named_and_rebuilt(tmp_path, tokenizer, corpus_file, damage):
    """3 faults to a packed data block cache (our own derived file): a flipped bit (the old code returned wrong
    token ids, or an IndexError later in training), a file cut in half (a SafetensorError traceback) and a file
    with no recorded checksum. Each is named, rebuilt from the documents, and the blocks equal the first build's."""
    from safetensors.torch import load_file, save_file

    from pocketlm.data.text import build_blocks, read_documents

    docs = read_documents(corpus_file)
    first = build_blocks(docs, tokenizer, block_size=16, cache_dir=tmp_path)
    (path,) = tmp_path.glob("blocks-*.safetensors")
    good = path.read_bytes()
    if damage == "flip a bit":
        data = bytearray(good)
        data[-3] ^= 0x10  # inside the last tensor's bytes
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(good[: len(good) // 2])
    else:
        save_file(load_file(str(path)), str(path))
    with pytest.warns(UserWarning, match=r"blocks-[0-9a-f]+\.safetensors .*rebuilding"):
        again = build_blocks(docs, tokenizer, block_size=16, cache_dir=tmp_path)
    assert torch.equal(first.train, again.train) and torch.equal(first.val, again.val)
    assert path.read_bytes() == good


# ---------------------------------------------------------------------------------------------- pipeline records
STAGE_RECORDS = {
    "a list": [1, 2],
    "facts a list": {"facts": ["student_dir"]},
    "a folder fact that is a number": {"facts": {"student_dir": 7}},
    "a file fact that is a list": {"facts": {"heldout_file": ["a", "b"]}},
}


@pytest.mark.parametrize("record", STAGE_RECORDS)
def test_stage_record_of_the_wrong_shape_is_redone(tmp_path, record):
    """4 cases: a stored stage record (stages/<name>.json) that is JSON but not of the shape pocketlm writes. The
    old code raised AttributeError / TypeError tracebacks; such a record is now redone, like a damaged one."""
    from pocketlm.pipeline import STAGE_SCHEMA, _stored

    rec = STAGE_RECORDS[record]
    if isinstance(rec, dict):
        rec = {"schema": STAGE_SCHEMA, "key": "k", **rec}
    path = tmp_path / "stages" / "distill.json"
    path.parent.mkdir()
    path.write_text(json.dumps(rec))
    assert _stored(path, "k", tmp_path) is None


def test_damaged_pipeline_key_stamp_restarts_the_stage(tmp_path):
    """1 case: distill/pipeline_key.txt (the key of the inputs a stage's checkpoints belong to) holding bytes that
    are not UTF-8. The old code failed with "'utf-8' codec can't decode" naming no file; now it reads as a key
    that does not match, so the stage starts over in its own folder."""
    from pocketlm.tasks.base import stamp_matches

    stamp = tmp_path / "pipeline_key.txt"
    stamp.write_bytes(b"\xff\xfe")
    assert not stamp_matches(stamp, "abc")
    stamp.write_text("abc\n")
    assert stamp_matches(stamp, "abc")


def test_damaged_heldout_record_is_named(tmp_path):
    """1 case: the held-out documents a pipeline recorded (distill/heldout.jsonl) damaged on disk: the error
    names the file instead of "'utf-8' codec can't decode" or a bare JSON error."""
    from types import SimpleNamespace

    from pocketlm.core.integrity import RecordError
    from pocketlm.tasks.perplexity import heldout as _heldout

    (tmp_path / "heldout.jsonl").write_bytes(b'{"text": "a"}\n{"text": \xff}\n')
    ctx = SimpleNamespace(out=tmp_path, fact=lambda name: "heldout.jsonl")
    with pytest.raises(RecordError, match=r"heldout\.jsonl"):
        _heldout(ctx)


# ---------------------------------------------------------------------------------------------- VLM folders
@pytest.mark.parametrize("content", [b"\xff{", b"[1]", b'{"format": "pocketlm-vlm/1"'])
@pytest.mark.parametrize("which", ["vlm_config.json", "encoder/config.json"])
def test_damaged_vlm_config_is_named(tmp_path, content, which):
    """2 × 3 cases: a VLM folder's vlm_config.json, or its ViT encoder's config.json, that is not UTF-8, not an
    object or cut short: the error names the file (the old code: "'utf-8' codec can't decode", an
    AttributeError traceback, or a bare JSON error)."""
    from pocketlm.models.vision import VisionLanguageModel
    from pocketlm.models.vit import ViT

    (tmp_path / "encoder").mkdir()
    (tmp_path / which).write_bytes(content)
    with pytest.raises(ValueError, match=which.replace(".", r"\.")):
        if which == "vlm_config.json":
            VisionLanguageModel.load(tmp_path)
        else:
            ViT.load(tmp_path / "encoder")
