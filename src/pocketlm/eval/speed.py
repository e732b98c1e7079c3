"""Deployment speed: how fast a model answers at batch 1, in llama.cpp (a GGUF file) and in transformers (a Hugging
Face folder), measured by one clock for both. `benchmarks/deploy_speed.py` and the pipeline's `export` stage call
`measure`; nothing else times generation for them.

One measurement is one model in one engine, in a process of its own, so its peak memory is its own: the worker reads
its high-water resident set (VmHWM) from /proc/self/status. Not `getrusage(RUSAGE_CHILDREN)` or `wait4`: Linux keeps
the parent's high-water RSS across `exec` in the child's ru_maxrss, so every child would weigh at least what the
parent held (measured here: a 10 MiB child of a 425 MiB parent reports 425 MiB). The worker is this file run as a
script (`runpy.run_path`, in an empty folder, so no file beside it or in the caller's folder shadows a module), so
the llama.cpp worker imports numpy and llama_cpp and nothing of pocketlm, whose import loads torch and transformers
(hundreds of MiB that the llama.cpp figure would otherwise carry). So this module imports only the standard library
and numpy at the top.

The clock (`greedy`), the same in both engines. For each prompt (token ids, the same ids for every engine):
t0 → a forward pass over the whole prompt → t1 → the argmax of the last logits → t2 → n − 1 times (a forward pass
of one token on the KV cache, its argmax) → t3. Prefill = t1 − t0; time to first token (TTFT) = t2 − t0 (the first
new token comes from the prefill's logits); decode = t3 − t2 for n − 1 tokens. End of text does not stop decoding.
Per repeat: prompt tokens/s = Σ prompt tokens / Σ prefill, decode tokens/s = Σ (n − 1) / Σ decode (sums, not means
of rates), TTFT = mean over prompts. Reported: the median over repeats, after `warmup` untimed passes over every
prompt. Each engine keeps its own defaults otherwise: llama.cpp's KV cache is F16, transformers' is in the
model's dtype.
"""
from __future__ import annotations

import inspect
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

SCHEMA = "pocketlm.speed/1"
ENGINES = ("llama.cpp", "transformers")
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # transformers precisions measured
PROMPTS = (  # plain prose, so every tokenizer makes a prompt of about the same length from it
    "The history of the city begins with a small market on the river, where farmers from the hills brought grain "
    "and wool to trade with the boatmen. Over the centuries the market grew into a town, the town built walls and "
    "a bridge, and the bridge made it rich, because every cart that crossed the river paid a toll to the council.",
    "She opened the letter and read it twice before she understood what it said. Her uncle, whom she had met only "
    "once as a child, had left her his house by the sea, on the condition that she live in it for one whole year "
    "and keep the lighthouse lamp burning every night until the spring.",
    "In the morning the ship left the harbour under a grey sky, and by noon the coast had disappeared behind them. "
    "The captain kept to the old route along the islands, although the new charts showed a shorter way, because "
    "he trusted the currents he knew more than the lines that other men had drawn.",
)


@dataclass(frozen=True)
class SpeedSettings:
    """How a model is timed: `threads` for every engine, `new_tokens` decoded per prompt (greedy), `repeats` timed
    passes (median reported) after `warmup` untimed ones, prompts cut to `max_prompt_tokens`."""

    threads: int = 2
    new_tokens: int = 64
    repeats: int = 3
    warmup: int = 1
    max_prompt_tokens: int = 128
    timeout_s: float = 1800.0  # one worker, all repeats

    def __post_init__(self) -> None:
        for name, low in (("threads", 1), ("new_tokens", 2), ("repeats", 1), ("warmup", 0), ("max_prompt_tokens", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be at least {low}, not {getattr(self, name)}")


def prompt_ids(tokenizer: Any, settings: SpeedSettings, context: int | None = None,
               prompts: Sequence[str] = PROMPTS) -> list[list[int]]:
    """Each prompt as the model's tokenizer encodes it (special tokens as the tokenizer adds them), cut to
    `max_prompt_tokens` and so that prompt + new tokens fit `context` (the model's trained length)."""
    room = settings.max_prompt_tokens if context is None else min(settings.max_prompt_tokens,
                                                                  context - settings.new_tokens)
    if room < 1:
        raise ValueError(f"the model's context ({context} tokens) leaves no room for a prompt before "
                         f"{settings.new_tokens} new tokens")
    out = [list(tokenizer(p)["input_ids"])[:room] for p in prompts]
    if any(not ids for ids in out):
        raise ValueError("a prompt encodes to no tokens")
    return out


# ---------------------------------------------------------------------------------------------------- the clock
@dataclass(frozen=True)
class Timing:
    """One prompt, one pass: seconds of each phase and what was decoded."""

    prompt_tokens: int
    prefill_s: float
    ttft_s: float
    decode_s: float
    generated: tuple[int, ...]


def greedy(forward: Callable[[list[int]], Any], reset: Callable[[], None], prompt: list[int],
           new_tokens: int) -> Timing:
    """Greedy decoding of `new_tokens` after `prompt`, timed by phase. `forward(ids)` extends the engine's KV cache
    by `ids` and returns the logits of the last position (any array with `argmax`); `reset()` empties the cache."""
    reset()
    t0 = time.perf_counter()
    logits = forward(prompt)
    t1 = time.perf_counter()
    token = int(logits.argmax())
    t2 = time.perf_counter()
    generated = [token]
    for _ in range(new_tokens - 1):
        token = int(forward([token]).argmax())
        generated.append(token)
    t3 = time.perf_counter()
    return Timing(len(prompt), t1 - t0, t2 - t0, t3 - t2, tuple(generated))


def summarise(passes: list[list[Timing]], new_tokens: int) -> dict[str, Any]:
    """Figures of each timed pass (a list of every prompt's `Timing`) and their medians."""
    per = [{"prompt_tokens_per_s": sum(t.prompt_tokens for t in p) / sum(t.prefill_s for t in p),
            "decode_tokens_per_s": len(p) * (new_tokens - 1) / sum(t.decode_s for t in p),
            "ttft_s": statistics.fmean(t.ttft_s for t in p)} for p in passes]
    return {**{k: statistics.median(r[k] for r in per) for k in per[0]}, "passes": per}


# ---------------------------------------------------------------------------------------------------- engines
class LlamaCppEngine:
    """A GGUF file in llama.cpp (llama-cpp-python's `Llama`, one sequence, the whole prompt in one batch)."""

    def __init__(self, path: str, threads: int, n_ctx: int) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.versions = {"llama_cpp_python": llama_cpp.__version__}

    def reset(self) -> None:
        self.llm.reset()  # the next eval drops the cache from position 0

    def forward(self, ids: list[int]) -> np.ndarray:
        self.llm.eval(ids)
        ptr = self._lib.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))


class TransformersEngine:
    """A Hugging Face folder in transformers, in `dtype`, with its dynamic KV cache."""

    def __init__(self, path: str, threads: int, dtype: str) -> None:
        import torch

        torch.set_num_threads(threads)
        if json.loads((Path(path) / "config.json").read_text()).get("model_type") == "pocketlm":
            # imported here, as torch is: a llama.cpp measurement's process never loads torch (its peak RSS)
            from pocketlm.models.student import register_auto_classes

            register_auto_classes()
        import transformers

        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        self.keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self.past = None
        params = {p.data_ptr(): p for p in self.model.parameters()}.values()  # a tied head once
        self.weight_bytes = sum(p.numel() * p.element_size() for p in params)
        self.versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                         "class": type(self.model).__name__}

    def reset(self) -> None:
        self.past = None

    def forward(self, ids: list[int]):
        kw = {"logits_to_keep": 1} if self.keep else {}
        with self.torch.inference_mode():
            out = self.model(input_ids=self.torch.tensor([ids]), past_key_values=self.past, use_cache=True, **kw)
        self.past = out.past_key_values
        return out.logits[0, -1]


# ---------------------------------------------------------------------------------------------------- worker
def _status_bytes(field: str) -> int:
    """A size field of /proc/self/status (VmHWM: peak resident set; VmRSS: now) in bytes."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Load one model in one engine and time it (`spec` as `measure` writes it); runs in its own process."""
    settings = SpeedSettings(**spec["settings"])
    prompts = spec["prompts"]
    before = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    if spec["engine"] == "llama.cpp":
        engine: Any = LlamaCppEngine(spec["path"], settings.threads, max(map(len, prompts)) + settings.new_tokens)
    else:
        engine = TransformersEngine(spec["path"], settings.threads, TORCH_DTYPES[spec["precision"]])
    load_s = time.perf_counter() - t0
    for _ in range(settings.warmup):
        for p in prompts:
            greedy(engine.forward, engine.reset, p, settings.new_tokens)
    passes = [[greedy(engine.forward, engine.reset, p, settings.new_tokens) for p in prompts]
              for _ in range(settings.repeats)]
    return {"schema": SCHEMA, "engine": spec["engine"], "precision": spec["precision"], "path": spec["path"],
            **summarise(passes, settings.new_tokens),
            "peak_rss_bytes": _status_bytes("VmHWM"), "rss_before_load_bytes": before, "load_s": load_s,
            "weight_bytes": getattr(engine, "weight_bytes", None),
            "prompt_tokens": [len(p) for p in prompts], "generated": [list(t.generated) for t in passes[0]],
            "settings": asdict(settings), "versions": engine.versions, "pid": os.getpid()}


def measure(engine: str, path: str | os.PathLike, precision: str, prompts: list[list[int]],
            settings: SpeedSettings) -> dict[str, Any]:
    """Time `path` in `engine` (llama.cpp: a .gguf file, `precision` its quant name; transformers: a folder,
    `precision` fp32 or bf16) in a fresh process; returns the worker's figures (see the module docstring)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    if engine == "transformers" and precision not in TORCH_DTYPES:
        raise ValueError(f"transformers precision {precision!r}; valid: {', '.join(TORCH_DTYPES)}")
    spec = {"engine": engine, "path": str(Path(path).resolve()), "precision": precision, "prompts": prompts,
            "settings": asdict(settings)}
    threads = str(settings.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory(prefix="pocketlm-speed-") as tmp:
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        run = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
        try:
            proc = subprocess.run([sys.executable, "-c", run, str(Path(__file__).resolve()), "spec.json"], cwd=tmp,
                                  env=env, capture_output=True, text=True, timeout=settings.timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"timing {path} in {engine} took over {settings.timeout_s:.0f} s") from None
        result = Path(tmp) / "result.json"
        if proc.returncode != 0 or not result.is_file():
            raise RuntimeError(f"timing {path} in {engine} ({precision}) failed (exit {proc.returncode}):\n"
                               + (proc.stderr or proc.stdout)[-3000:])
        return json.loads(result.read_text())


if __name__ == "__main__":  # the worker: speed.py SPEC.json, run by `measure` (writes result.json beside it)
    spec_path = Path(sys.argv[1])
    figures = run_worker(json.loads(spec_path.read_text()))
    (spec_path.parent / "result.json").write_text(json.dumps(figures))
