"""The model card (README.md) of an export: how the model was made, in the words and figures of its run."""

from __future__ import annotations

import json
import math

from minima import __version__
from minima.config import Config


def model_card(cfg: Config, metrics: dict, *, dtype: str) -> str:
    """Markdown with a Hugging Face metadata header: teacher, student initialisation, data, objective, length and
    held-out figures of the run that produced the export (``metrics`` as written to metrics.json)."""
    kd, chat = cfg.kd, metrics.get("data")
    if chat is not None:
        made = "instruction tuning (MiniChat): cross-entropy on the assistant replies and their end-of-turn tokens"
        made += "" if cfg.teacher is None else ", with token-level distillation from the teacher on the same tokens"
        teacher = "none" if cfg.teacher is None else _model(cfg.teacher.path, cfg.teacher.arch)
        objective = "CE" if cfg.teacher is None else f"{kd.ce_weight:g} * CE + {kd.kd_weight:g} * T^2 * {kd.divergence}"
    elif cfg.teacher is None:
        made = "language-model training (no teacher): cross-entropy on the next token"
        teacher = "none"
        objective = "CE"
    else:
        made = "token-level knowledge distillation (MiniMA): the student learns the teacher's next-token distribution"
        teacher = _model(cfg.teacher.path, cfg.teacher.arch)
        teacher += f" ({metrics['teacher_params'] / 1e6:.2f}M parameters without input embedding)"
        objective = f"{kd.ce_weight:g} * CE + {kd.kd_weight:g} * T^2 * {kd.divergence}(teacher, student)"
        objective += f", T = {kd.temperature:g}"
    student = _model(cfg.student.path, cfg.student.arch)
    val = _figure(metrics.get("val_loss"))
    teacher_val = _figure(metrics.get("teacher_val_loss"))
    data = f"`{cfg.data.dir}`, windows of {cfg.data.seq_len} tokens (the trained context)"
    if chat is not None:
        data += f"; {chat['conversations']:,} conversations in the {chat['template']} chat template"
        data += ", packed" if chat.get("pack") else ", one per window"
    rows = [
        ("made by", f"minima {__version__}: {made}"),
        ("teacher", teacher),
        ("student initialised from", student),
        ("parameters", f"{metrics['student_params'] / 1e6:.2f}M (without input embedding)"),
        ("data", data),
        ("trained on", f"{metrics['tokens_seen']:,} tokens in {metrics['step']:,} optimizer steps"),
        ("objective", objective),
        ("optimizer", f"AdamW, lr {cfg.optim.lr:g}, warmup + cosine to {cfg.optim.min_lr_ratio:g} x lr"),
        ("held-out loss", f"{val} (teacher: {teacher_val}); nats per token, perplexity = exp(loss)"),
        ("weights", dtype),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- minima
- knowledge-distillation
---

# {cfg.run.out_dir.rstrip("/").rsplit("/", 1)[-1]}

| | |
|---|---|
{table}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("PATH")
tokenizer = AutoTokenizer.from_pretrained("PATH")
```

The run's resolved configuration:

```json
{json.dumps(cfg.to_dict(), indent=2, default=str)}
```
"""


def _model(path: str | None, arch: dict | None) -> str:
    if path is not None:
        return f"`{path}`"
    return "a random initialisation of " + ", ".join(f"{k}={v}" for k, v in (arch or {}).items())


def _figure(loss: float | None) -> str:
    return "n/a" if loss is None else f"{loss:.4f} (ppl {math.exp(min(loss, 700.0)):.2f})"
