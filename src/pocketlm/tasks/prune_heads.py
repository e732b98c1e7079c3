"""Head pruning of the distilled models (``inspect.prune_heads``, Michel et al., 2019): each chosen model loses its
``heads`` least important attention heads (whole KV groups), measured on part of ``data``; held-out perplexity
before and after, with the paired difference. The pruned copy is saved in ``inspect/prune_heads/<role>/student``.

Each model is pruned and judged against itself (its own before and after), so there is no delta to the teacher.
`pocketlm prune-heads` calls the same function, `pocketlm.inspect.prune.prune_heads_results`. (Structured pruning
of width and depth, `inspect.prune_model`, is the distill task's ``student.init: pruned``.)
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from pocketlm.core.config import StrictModel
from pocketlm.tasks.base import Context, Entry, StageOutput, Task, View, register

ENTRY = "prune_heads"


class PruneHeadsProbe(StrictModel):
    """Remove the least important heads of each chosen model and measure what it costs; off by default."""

    enabled: bool = False
    data: Optional[str] = None  # text: importance on part of it, perplexity on the held-out rest
    heads: Optional[int] = Field(None, ge=1)  # query heads to remove (whole KV groups: a multiple of the group size)
    roles: list[Literal["teacher", "student", "ce_baseline"]] = Field(["student"], min_length=1)
    field: str = "text"
    split: str = "train"
    txt_split: Literal["blank_lines", "wikitext_headings", "lines"] = "blank_lines"
    max_documents: Optional[int] = Field(None, ge=1)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    block_size: int = Field(128, ge=2)
    max_blocks: int = Field(64, ge=1)
    batch_size: int = Field(8, ge=1)
    max_length: Optional[int] = Field(None, ge=1)
    normalize: bool = True  # rank layer-normalised importance (Michel et al. §4.1)

    @field_validator("roles")
    @classmethod
    def _once_each(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"a role is named twice: {v}")
        return v

    @model_validator(mode="after")
    def _needs_when_on(self) -> "PruneHeadsProbe":
        if self.enabled:
            missing = [f for f in ("data", "heads") if getattr(self, f) is None]
            if missing:
                raise ValueError(f"{', '.join(missing)}: enabled needs the text to measure on and the number of "
                                 "heads to remove")
        return self


def _enough(docs: list[str], tokenizer: Any, block_size: int) -> list[str]:
    """The first documents that hold at least one block's tokens (all of them when they do not): packing these is
    packing all of them, as far as whether a block comes out."""
    tokens = 0
    for i, doc in enumerate(docs):
        tokens += len(tokenizer(doc, add_special_tokens=False)["input_ids"]) + 1  # and the EOS between documents
        if tokens >= block_size:
            return docs[: i + 1]
    return docs


def attention_shape(config: Any) -> tuple[int, list[int]]:
    """(query heads per KV head, KV heads of each layer) of a model config (a pruned pocketlm model's kept ones)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    kv = int(getattr(text, "num_key_value_heads", None) or heads)
    kept = getattr(text, "kept_kv_heads", None)
    return heads // kv, [len(k) for k in kept] if kept else [kv] * int(text.num_hidden_layers)


def check_heads(cfg: Any) -> None:
    """``heads`` against each chosen role's attention, by `inspect.prune.check_head_count` (the rules
    `plan_pruning` applies at run time), read from the teacher folder's config.json and the student section (the
    CE twin is built as the student is). A teacher given otherwise (a .gguf, a hub id) is checked at run time."""
    from pocketlm.inspect.prune import check_head_count
    from pocketlm.inspect.size import load_size_config, student_config
    from pocketlm.models.load import resolve

    p = cfg.inspect.prune_heads
    if resolve(cfg.teacher).kind != "folder":
        return
    teacher, _ = load_size_config(cfg.teacher)
    for role in p.roles:
        group, kv_heads = attention_shape(teacher if role == "teacher" else student_config(cfg, teacher))
        check_head_count(p.heads, group, kv_heads,
                         name=f"inspect.prune_heads.heads (the {role}: {len(kv_heads)} layers, {sum(kv_heads)} KV "
                              f"heads of {group} query heads each)")


class PruneHeadsTask(Task):
    name, phase = "prune_heads", "inspect"
    requires = "pocketlm.inspect.prune"
    views = (View("prune_heads", group_headlines=("token_perplexity", "attention_heads", "parameters"),
                  group_label="pruning", summary_rows=1),)
    fixed_entries = (ENTRY,)

    def enabled(self, cfg: Any) -> bool:
        return cfg.inspect.prune_heads.enabled

    def measures(self, cfg: Any) -> list[str]:
        return [ENTRY]

    def check(self, ctx: Context) -> None:
        """Before any model work: the documents read (as `prune_heads_results` will read them), split, and at least
        one training block packed from the importance part; ``heads`` checked against each role's attention shape
        (from the teacher folder's config.json and the student section)."""
        from pocketlm.data.text import DataError, hash_documents, pack, read_documents, split_documents
        from pocketlm.models.load import load_tokenizer

        p = ctx.cfg.inspect.prune_heads
        check_heads(ctx.cfg)
        path = ctx.cfg.data_path(p.data)
        if not path.exists():
            ctx.missing(ENTRY, "inspect.prune_heads.data", path)
            return
        docs = read_documents(path, field=p.field, split=p.split, max_documents=p.max_documents,
                              txt_split=p.txt_split)
        try:
            train, _ = split_documents(docs, p.val_fraction, ctx.seed)
            tokenizer = load_tokenizer(ctx.cfg.teacher, trust_remote_code=(ctx.cfg.trust_remote_code or None))
            pack(_enough(train, tokenizer, p.block_size), tokenizer, p.block_size)  # the run packs all of them
        except DataError as e:
            raise DataError(f"inspect.prune_heads.data: {path} leaves no training block for the head importance "
                            f"({e}); add text, or lower inspect.prune_heads.block_size or val_fraction") from None
        ctx.inputs[ENTRY] = {"path": path, "hash": hash_documents(docs)}

    def inputs(self, ctx: Context) -> dict[str, Any]:
        p = ctx.cfg.inspect.prune_heads
        return {"probe": p.model_dump(mode="json"), "data": ctx.inputs[ENTRY]["hash"], "seed": ctx.seed,
                "models": ctx.fingerprints(list(p.roles))}

    def run(self, ctx: Context) -> StageOutput:
        """Each chosen model pruned from its folder (the teacher from its spec); the pruned copy's folder is a fact
        (``prune_heads_<role>_dir``), so a stored record whose folder is gone is redone."""
        from pocketlm.inspect.prune import prune_heads_results

        p = ctx.cfg.inspect.prune_heads
        entries, facts = [], {}
        for role in p.roles:
            res = prune_heads_results(
                ctx.spec(role), str(ctx.inputs[ENTRY]["path"]), p.heads, ctx.out / "inspect" / ENTRY / role,
                field=p.field, split=p.split, txt_split=p.txt_split, max_documents=p.max_documents,
                val_fraction=p.val_fraction, block_size=p.block_size, max_blocks=p.max_blocks,
                batch_size=p.batch_size, max_length=p.max_length, normalize=p.normalize, seed=ctx.seed,
                progress=ctx.progress, trust_remote_code=(ctx.cfg.trust_remote_code or None))
            res.model["role"] = role
            res.details["student"] = facts[f"{ENTRY}_{role}_dir"] = ctx.rel(res.details["student"])
            res.details["pruned_model"]["spec"] = res.details["student"]  # names inside the output folder
            entries.append(Entry(role, ENTRY, res))
        return StageOutput(entries, facts)


TASK = register(PruneHeadsTask())
