"""Why a written edit does or does not carry to its paraphrase: the paraphrase's key at the
subject's last token against the keys the edit was written at, beside the generalization
each edit scored in a finished cell.

    python -m bench.rephrase_keys /root/rlsedit-runs/grid-cpu-1k-p10rw1/cells/smollm2-135m-rlsedit-L23456-m1300-half-p10-rw1-s0 --append

Reads the cell's per-edit scores (`final_scores.json`: edit i is record i of the stream's
file, a stream that skipped no records) and its settings (`summary.json`: data, prefixes,
seed). On the unedited model, at `--layer`, each edit's keys under the cell's context
templates (the bare prompt and its prefixed copies, MEMIT's ". " before the prompt) and,
with `--styles mid`, the same prefixes without the period, so that the subject follows
the prefix mid-sentence; then the paraphrase's key. Per edit: the cosine to the
`bare_half` key (what one RLS row holds) and the largest cosine to any single prompt key.
Edits are grouped by where the paraphrase puts the subject (first; after a sentence;
after other words) and by quarter of the largest cosine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

import torch
import torch.nn.functional as F

from bench.docs import publish
from tasks.data import load_requests
from tasks.extract.keys import compute_keys, mix_keys
from tasks.extract.prompts import make_context_templates, rewrite_batch
from tasks.extract.tokens import build_batch
from tasks.models import load_model

# How many of the n prefixes run on into the prompt (`values.open_prefixes`) per style
STYLES = {"period": lambda n: 0, "mid": lambda n: n}


def subject_place(prompt: str, subject: str) -> str:
    """Where `prompt` puts `subject`: first, after a sentence (". ", "? ", "! ") or after
    other words of its own sentence."""
    before = prompt[:prompt.find(subject)].rstrip()
    if not before:
        return "subject first"
    return "after a sentence" if before.endswith((".", "?", "!")) else "after other words"


@torch.no_grad()
def key_cosines(lm, layer: int, requests, templates: list[str],
                chunk: int = 50) -> list[tuple[float, float]]:
    """Per request: (cosine of its first paraphrase's key to the bare_half key, largest
    cosine to any one prompt key), keys at `layer` of the subject's last token."""
    found = []
    for start in range(0, len(requests), chunk):
        part = requests[start:start + chunk]
        batch, groups = rewrite_batch(lm.tokenizer, part, templates)
        rows, edit_of_row = compute_keys(lm, layer, batch, groups, len(part), "rows")
        mixed, _ = mix_keys(rows, edit_of_row, len(part), "bare_half")
        texts = [r.rephrase_prompts[0] for r in part]
        ends = [t.find(r.subject) + len(r.subject) for t, r in zip(texts, part)]
        reph, _ = compute_keys(lm, layer, build_batch(lm.tokenizer, texts, ends),
                               torch.arange(len(part)), len(part), "rows")
        for e in range(len(part)):
            best = F.cosine_similarity(reph[e][None], rows[edit_of_row == e], dim=1).max()
            found.append((float(F.cosine_similarity(reph[e], mixed[e], dim=0)), float(best)))
    return found


def groups_of(requests, best: list[float]) -> dict[str, list[int]]:
    """{group name: edit indices}: by where the paraphrase puts the subject, then by
    quarter of the largest cosine to a prompt key."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(subject_place(r.rephrase_prompts[0], r.subject), []).append(i)
    order = sorted(range(len(best)), key=best.__getitem__)
    quarter = len(order) // 4
    for q in range(4):
        part = order[q * quarter:(q + 1) * quarter if q < 3 else len(order)]
        groups[f"largest cosine, quarter {q + 1} (from {best[part[0]]:.3f})"] = part
    return groups


def table(requests, generalization: list[float], cosines: dict[str, list]) -> str:
    """Markdown: per group, the edits, their generalization and each style's cosines."""
    first = next(iter(cosines))
    header = ["paraphrases", "edits", "generalization",
              *(f"{s}: {c}" for s in cosines for c in ("cos to the row's key", "largest cos"))]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, idx in groups_of(requests, [b for _, b in cosines[first]]).items():
        cells = [f"{mean(cos[i][k] for i in idx):.3f}" for cos in cosines.values() for k in (0, 1)]
        lines.append(f"| {name} | {len(idx)} | {mean(generalization[i] for i in idx):.3f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cell_dir")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--styles", nargs="+", default=["period", "mid"], choices=list(STYLES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--append", action="store_true", help="add the table to docs/benchmarks.md")
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    cell = Path(opts.cell_dir)
    if not (cell / "final_scores.json").is_file():
        raise SystemExit(f"no final_scores.json in {cell}: give the cells/<name> folder of a finished cell")
    scores = json.loads((cell / "final_scores.json").read_text())
    if scores["edits"] != list(range(len(scores["edits"]))):
        raise SystemExit(f"{cell}'s scores are not of edits 0..n-1 in order: a stream that skipped records")
    config = json.loads((cell / "summary.json").read_text())["config"]
    requests = load_requests(config["data"], limit=len(scores["edits"]))
    kept = [i for i, r in enumerate(requests) if r.rephrase_prompts
            and r.subject in r.rephrase_prompts[0]]       # a paraphrase with the subject
    requests = [requests[i] for i in kept]
    lm = load_model(opts.model)
    n, tokens = config["values"]["n_prefixes"], config["values"]["prefix_tokens"]
    cosines = {s: key_cosines(lm, opts.layer, requests, make_context_templates(
                   lm, n, tokens, config["seed"], open_prefixes=STYLES[s](n)))
               for s in opts.styles}
    generalization = [scores["generalization"][i] for i in kept]
    publish(table(requests, generalization, cosines), opts.append,
            f"Paraphrase keys against the written keys: {cell.name}, layer {opts.layer}",
            "bench.rephrase_keys", argv, f"this machine, {opts.threads} thread(s), unedited model")


if __name__ == "__main__":
    main()
