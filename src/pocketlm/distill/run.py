"""`pocketlm distill`: teacher + data → blocks → (teacher cache) → student → trained checkpoint.

Every intermediate product lives in the run folder and is reused when its inputs match (the teacher-written
corpus, the token blocks, the teacher cache), so a re-run after an interruption continues instead of starting over.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pocketlm.core import distributed as dist
from pocketlm.distill.config import DistillConfig
from pocketlm.data.synthetic import teacher_corpus
from pocketlm.data.books import book_paths, decontaminate_training, read_books, read_text
from pocketlm.data.text import DataError, TokenBlocks, build_blocks, heldout_indices, read_documents
from pocketlm.distill.checkpoint import latest_checkpoint
from pocketlm.distill.cache import TeacherCache, build_teacher_cache
from pocketlm.distill.trainer import Trainer, TrainResult
from pocketlm.models.hf_export import FolderFormat, save_student_folder
from pocketlm.models.importance import Importance
from pocketlm.models.init import init_student_from_teacher, student_config_from_teacher
from pocketlm.models.load import (
    check_vocab_compatible, fingerprint_model, fingerprint_tokenizer, folder_shape, load_model, parse_dtype,
)
from pocketlm.models.pruning import PruneTarget, PruneTargetError, choose_target, prune_model, source_config
from pocketlm.models.student import PocketLMForCausalLM
from pocketlm.models.upcycle import upcycle
from pocketlm.core.config import ConfigError
from pocketlm.core.integrity import RecordError, read_json
from pocketlm.core.io import atomic_path, write_text_atomic
from pocketlm.core.outdir import MIN_FREE, check_space, output_folder
from pocketlm.core.paths import check_outputs


OUTPUTS = ("checkpoints", "student", "teacher_cache", "data", "metrics.jsonl", "config.json", "moe_load.png",
           "importance.json")


@dataclass
class Prepared:
    """What every student of one run shares: the teacher, its tokenizer, the documents and the blocks."""

    teacher: Any
    tokenizer: Any
    teacher_fingerprint: str
    tokenizer_fingerprint: str
    blocks: TokenBlocks  # with the held-out documents, `blocks.val_docs`


def _corpus_path(out: Path, cfg: DistillConfig, teacher_fp: str) -> Path:
    key = hashlib.sha256(json.dumps([teacher_fp, cfg.data.synthetic.model_dump(), cfg.train.seed]).encode())
    return out / "data" / f"teacher-corpus-{key.hexdigest()[:12]}.jsonl"


def source_documents(cfg: DistillConfig) -> list[str] | None:
    """The documents of `data.source` (None when the teacher writes the corpus); a missing, empty or non-UTF-8
    source (a books folder: any text), a missing `data.decontaminate` file and an unknown `data.heldout` name are
    refused here, before the teacher is loaded."""
    d = cfg.data
    for i, p in enumerate(d.decontaminate or ()):
        if not Path(p).expanduser().is_file():
            raise DataError(f"data.decontaminate.{i}: evaluation text not found: {p}")
    if d.source is None:
        return None
    if d.format == "books":
        books = read_books(d.source)[: d.max_documents]
        if d.heldout:
            heldout_indices([b.name for b in books], d.heldout, "data.heldout")
        return [b.text for b in books]
    return read_documents(d.source, field=d.field, split=d.split, max_documents=d.max_documents)


def load_documents(cfg: DistillConfig, teacher, tokenizer, teacher_fp: str, out: Path, progress: bool) -> list[str]:
    docs = source_documents(cfg)
    if docs is not None:
        return docs
    d = cfg.data
    path = _corpus_path(out, cfg, teacher_fp)
    if path.is_file():
        return read_documents(path, field="text")
    s = d.synthetic
    writer = teacher
    if s.dtype != cfg.teacher_dtype:  # a cast copy: casting the teacher itself would round its weights for good
        writer = copy.deepcopy(teacher).to(parse_dtype(s.dtype))
    docs = teacher_corpus(
        writer, tokenizer, num_documents=s.num_documents, max_new_tokens=s.max_new_tokens,
        temperature=s.temperature, top_p=s.top_p, batch_size=s.batch_size, seed=cfg.train.seed, progress=progress,
    )
    del writer
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    return docs


def prepare(cfg: DistillConfig, *, progress: bool = True, teacher=None, tokenizer=None) -> Prepared:
    """Load the teacher and build the token blocks (both reused by every student of the run)."""
    out = Path(cfg.output_dir)
    docs = source_documents(cfg)  # bad data fails before the teacher is loaded
    if teacher is None:
        shape = folder_shape(cfg.teacher)  # the teacher-bound fields, before its weights are read
        if shape is not None:
            cfg.check_teacher(*shape)
        teacher, tokenizer = load_model(cfg.teacher, dtype=cfg.teacher_dtype, trust_remote_code=cfg.trust_remote_code or None)
        teacher.to(dist.device())  # this process's accelerator (cuda:local_rank under a launcher), else the CPU
    check_teacher_fields(cfg, teacher)  # before any corpus, block or cache is written
    t_fp, k_fp = fingerprint_model(teacher), fingerprint_tokenizer(tokenizer)
    if docs is None:
        docs = load_documents(cfg, teacher, tokenizer, t_fp, out, progress)
    d = cfg.data
    names = [p.name for p in book_paths(d.source)][: len(docs)] if d.format == "books" else None
    summary = None
    if d.decontaminate or d.heldout:  # the training documents only: a held-out book is scored whole
        against = [(Path(p).name, read_text(p)) for p in d.decontaminate or ()]  # labelled by name, not spelling
        docs, names, summary = decontaminate_training(docs, names, heldout=d.heldout, against=against)
    blocks = build_blocks(
        docs, tokenizer, block_size=d.block_size, val_fraction=d.val_fraction, seed=cfg.train.seed,
        cache_dir=out / "data", tokenizer_fingerprint=k_fp, names=names, heldout=d.heldout,
        max_train_tokens=d.max_train_tokens, decontamination=summary,
    )
    return Prepared(teacher, tokenizer, t_fp, k_fp, blocks)


def check_teacher_fields(cfg: DistillConfig, teacher) -> None:
    """`DistillConfig.check_teacher` against the loaded teacher's depth and output vocabulary, and a pruned
    student's target against the teacher's widths (`models.pruning.check_target`)."""
    conf = teacher.config.get_text_config(decoder=True)
    cfg.check_teacher(int(conf.num_hidden_layers), int(teacher.get_output_embeddings().weight.shape[0]))
    if cfg.student.init == "pruned":
        try:  # the target and the widths it gives (a target_params no width meets, too)
            choose_target(source_config(teacher), prune_target(cfg), cfg.student.pruning.removal_blocks)
        except PruneTargetError as e:
            raise ConfigError(f"invalid config for the teacher {cfg.teacher}:\n  student.{e}") from None


def prune_target(cfg: DistillConfig) -> PruneTarget:
    s = cfg.student
    return PruneTarget(num_layers=s.num_layers, intermediate_size=s.intermediate_size,
                       num_key_value_heads=s.num_key_value_heads, hidden_size=s.hidden_size,
                       target_params=s.target_params, axis=s.pruning.axis, depth_metric=s.pruning.depth_metric)


IMPORTANCE_FILE = "importance.json"
IMPORTANCE_VERSION = 1  # raised when a score's definition changes, so older records are measured again


def calibration_blocks(train: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """`n` training blocks (all when fewer), a seeded sample in a fixed order: the pruning calibration set."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    return train[order.sort().values]


def pruned_student(cfg: DistillConfig, teacher, prep: Prepared | None, out: Path | None, progress: bool = False):
    """The teacher pruned to the student's target by importance on calibration blocks of the training data; the
    scores and the plan go to out/importance.json, and a later run with the same teacher, data and settings reads
    the scores back instead of measuring them again."""
    if prep is None:
        raise ValueError("student.init: pruned measures importance on the training data; pass the prepared data")
    p = cfg.student.pruning
    key = {"version": IMPORTANCE_VERSION, "teacher": prep.teacher_fingerprint, "data": prep.blocks.data_hash,
           "seed": cfg.train.seed,
           "calibration_blocks": p.calibration_blocks, "removal_blocks": p.removal_blocks,
           "bf16": cfg.train.precision == "bf16"}
    path = out / IMPORTANCE_FILE if out is not None else None
    importance = None
    if path is not None and path.is_file():
        try:
            doc = read_json(path, "importance record")
            if isinstance(doc, dict) and doc.get("key") == key:
                importance = Importance.read(path)
                if not importance.fits(source_config(teacher)):
                    raise RecordError(f"{path}: the scores do not have the teacher's shape")
        except RecordError as e:
            warnings.warn(f"{e}; measuring importance again", stacklevel=2)
            importance = None  # measured again and rewritten
    calibration = calibration_blocks(prep.blocks.train, p.calibration_blocks, cfg.train.seed)
    student, plan, importance = prune_model(
        teacher, prune_target(cfg), calibration, removal_blocks=p.removal_blocks, batch_size=p.batch_size,
        bf16=cfg.train.precision == "bf16", importance=importance, progress=progress,
    )
    if path is not None and dist.is_main():
        write_text_atomic(path, json.dumps({"key": key, "importance": importance.to_dict(), "plan": plan.to_dict()},
                                           indent=1))
    return student


def build_student(cfg: DistillConfig, teacher, *, prep: Prepared | None = None, out: Path | None = None,
                  progress: bool = False):
    """The student `cfg.student` describes, from the teacher (its layers, a pruned copy, or a fresh model);
    MoE students are upcycled from the dense one. `prep` (the training blocks) is needed by init: pruned."""
    s = cfg.student
    check_teacher_fields(cfg, teacher)
    torch.manual_seed(cfg.train.seed)
    if s.init in ("teacher_layers", "pruned"):  # an MoE student is the dense student, upcycled
        if s.init == "pruned":
            student = pruned_student(cfg, teacher, prep, out, progress)
        else:
            conf = student_config_from_teacher(teacher.config, num_layers=s.num_layers, layers=s.layers,
                                               sliding_window=s.sliding_window)
            student = init_student_from_teacher(teacher, conf, layers=s.layers)
        if s.moe is not None:
            student = upcycle(student, s.moe, seed=cfg.train.seed)
    else:
        overrides = {k: v for k, v in s.model_dump().items()
                     if k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                              "tie_word_embeddings", "moe", "position_scheme", "sliding_window") and v is not None}
        conf = student_config_from_teacher(teacher.config, num_layers=s.num_layers, layers=s.layers, **overrides)
        student = PocketLMForCausalLM(conf)
    check_vocab_compatible(teacher, student)
    return student.float()


def get_cache(cfg: DistillConfig, prep: Prepared, progress: bool) -> TeacherCache:
    return build_teacher_cache(
        prep.teacher, prep.blocks.train, Path(cfg.output_dir) / "teacher_cache", k=cfg.distill.top_k,
        teacher_fingerprint=prep.teacher_fingerprint, tokenizer_fingerprint=prep.tokenizer_fingerprint,
        data_hash=prep.blocks.data_hash, batch_size=cfg.train.eval_batch_size, progress=progress,
        max_memory=cfg.max_memory_bytes(),
    )


@dataclass
class DistillResult:
    student_dir: str
    train: TrainResult
    teacher_fingerprint: str
    data_hash: str
    n_train_tokens: int
    student_format: FolderFormat | None = None  # the final folder's layout, and why not a standard one (rank 0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["train"].pop("history", None)
        return d


def run_distill(
    cfg: DistillConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    prepared: Prepared | None = None,
    desc: str = "distill",
    overwrite: bool = False,
) -> DistillResult:
    """Distill as `cfg` says into `cfg.output_dir`, a folder this run holds (`pocketlm.core.outdir.output_folder`: new
    or a distill folder of ours, locked for the run; `overwrite` lets a foreign folder receive the run)."""
    dist.init()  # under torchrun / accelerate launch: join the process group (no-op for one process)
    out = Path(cfg.output_dir)
    check_outputs(out, OUTPUTS)
    # rank 0 holds the folder (checked, marked, locked); a failure before anything is written leaves no folder
    held = output_folder(out, kind="distill", what="output_dir", overwrite=overwrite) if dist.is_main() else None
    with held or contextlib.nullcontext():
        if not resume and latest_checkpoint(out / "checkpoints") is not None:
            raise FileExistsError(f"{out} already holds checkpoints of a run; pass --resume to continue it, or "
                                  f"choose another output_dir")
        dist.barrier()  # every rank has checked for old checkpoints before anyone can write a new one
        with dist.main_first():  # rank 0 writes the teacher corpus and the token blocks; the others then read them
            prep = prepared or prepare(cfg, progress=progress and dist.is_main())
        student = build_student(cfg, prep.teacher, prep=prep, out=out, progress=progress and dist.is_main())
        if dist.is_main():
            check_space(out, run_bytes(cfg, student, prep, out), f"output_dir {out}")
        cache = get_cache(cfg, prep, progress and dist.is_main()) if cfg.distill.mode == "cache" else None
        trainer = Trainer(
            student, train_blocks=prep.blocks.train, val_blocks=prep.blocks.val, train_cfg=cfg.train,
            loss_cfg=cfg.distill, out_dir=out,
            teacher=prep.teacher if cfg.distill.mode in ("online", "on_policy") else None,
            cache=cache, tokenizer=prep.tokenizer, progress=progress, desc=desc,
            run_info={"config": {k: v for k, v in cfg.model_dump(mode="json").items() if k != "output_dir"},
                      "teacher_fingerprint": prep.teacher_fingerprint, "data_hash": prep.blocks.data_hash},
        )
        if resume:
            trainer.resume()  # refuses a checkpoint written by a different config, teacher or data
        if dist.is_main():
            write_text_atomic(out / "config.json", json.dumps(cfg.model_dump(mode="json"), indent=2))
        result = trainer.train()
        model = trainer.accelerator.unwrap_model(trainer.student)
        # the final student as a Hugging Face folder in the most standard layout that represents it exactly
        # (Llama, Mixtral, else pocketlm's own with the reason); checkpoints stay in pocketlm's layout, which
        # resumes training exactly. student/ is ours: inside the run folder this run holds
        dest, layout = out / "student", None
        if dist.is_main():
            _, layout = save_student_folder(model, prep.tokenizer, dest, overwrite=True)
            if layout.reason:
                warnings.warn(f"{dest} is written in pocketlm's layout (model_type pocketlm; loading it needs "
                              f"`import pocketlm`), not a standard one: {layout.reason}", stacklevel=2)
        dist.barrier()
    return DistillResult(str(dest), result, prep.teacher_fingerprint, prep.blocks.data_hash, prep.blocks.n_tokens,
                         layout)


def run_bytes(cfg: DistillConfig, student, prep: Prepared, out: Path) -> int:
    """Disk a run still needs: its checkpoints (fp32 weights and two AdamW moments each, `keep_checkpoints` + 1
    while the next is written), the final student, and the teacher cache unless it is already complete."""
    weights = sum(p.numel() for p in student.parameters()) * 4
    need = MIN_FREE + weights * 3 * (cfg.train.keep_checkpoints + 1) + weights
    if cfg.distill.mode == "cache" and not (out / "teacher_cache" / "manifest.json").is_file():
        n, L = prep.blocks.train.shape
        need += n * L * (cfg.distill.top_k * (2 + 4) + 4)  # float16 log-probs, int32 indices, float32 tail
    return need
