"""Writes the zoo's lm-eval tasks: local JSONL splits and the task/group YAMLs under ``eval_tasks/zoo``.

The committed files under ``eval_tasks/zoo`` are the output of :func:`write_eval_tasks`; rerunning
it reproduces them byte for byte (the data is drawn from fixed seeds). Each skill gets two disjoint
held-out splits drawn from the evaluation part of its example space (never trained on):

* ``search`` — what a merge search optimises;
* ``report`` — what the final report quotes, never seen by the search.

and two task variants per split: ``zoo_<skill>_<split>`` (multiple-choice log-likelihood, ``acc``)
and ``zoo_<skill>_<split>_gen`` (greedy generation until a newline, ``exact_match``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from evomerge.zoo.skills import Example, sample

SPLITS = ("search", "report")
EXAMPLES_PER_SPLIT = 300
_SPLIT_SEEDS = {"search": 1001, "report": 2002}

_MC_TEMPLATE = """\
# Shared part of the zoo's multiple-choice tasks (included by zoo_<skill>_<split>.yaml).
# The choice with the highest summed log-likelihood after the prompt is the model's answer.
dataset_path: json
test_split: test
output_type: multiple_choice
doc_to_text: "{{prompt}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_GEN_TEMPLATE = """\
# Shared part of the zoo's generation tasks (included by zoo_<skill>_<split>_gen.yaml).
# Greedy decoding until a newline; the answer must match exactly.
dataset_path: json
test_split: test
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: answer
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 16
filter_list:
  - name: strip
    filter:
      - function: remove_whitespace
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: false
    ignore_punctuation: false
metadata:
  version: 1.0
"""


def task_name(skill: str, split: str, gen: bool = False) -> str:
    """lm-eval task name of one skill/split/variant, e.g. ``zoo_add_search`` or ``zoo_add_report_gen``."""
    return f"zoo_{skill}_{split}" + ("_gen" if gen else "")


def group_name(split: str, gen: bool = False) -> str:
    """lm-eval group of all skills of one split/variant, e.g. ``zoo_search`` or ``zoo_report_gen``."""
    return f"zoo_{split}" + ("_gen" if gen else "")


def split_examples(skill: str, split: str, n: int = EXAMPLES_PER_SPLIT) -> list[Example]:
    """The ``n`` distinct examples of one held-out split, drawn from a fixed seed.

    The report split skips every prompt of the search split, so the two never share a prompt."""
    rng = random.Random(f"{skill}/{_SPLIT_SEEDS[split]}")
    excluded = {ex.prompt for ex in split_examples(skill, "search", n)} if split == "report" else set()
    seen: dict[str, Example] = {}
    while len(seen) < n:
        ex = sample(skill, rng, "eval")
        if ex.prompt not in seen and ex.prompt not in excluded:
            seen[ex.prompt] = ex
    return list(seen.values())


def write_eval_tasks(out_dir: Path, skills: tuple[str, ...], n: int = EXAMPLES_PER_SPLIT) -> list[Path]:
    """Write data and YAMLs for ``skills`` into ``out_dir``; return the written paths."""
    out_dir = Path(out_dir)
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    written = []

    def put(rel: str, text: str) -> None:
        path = out_dir / rel
        path.write_text(text)
        written.append(path)

    put("_mc_template_yaml", _MC_TEMPLATE)
    put("_gen_template_yaml", _GEN_TEMPLATE)
    for skill in skills:
        for split in SPLITS:
            rows = [{"prompt": ex.prompt, "answer": ex.answer, "choices": list(ex.choices),
                     "label": ex.label} for ex in split_examples(skill, split, n)]
            data = f"data/{skill}_{split}.jsonl"
            put(data, "".join(json.dumps(r) + "\n" for r in rows))
            for gen in (False, True):
                template = "_gen_template_yaml" if gen else "_mc_template_yaml"
                put(f"{task_name(skill, split, gen)}.yaml",
                    f"include: {template}\ntask: {task_name(skill, split, gen)}\n"
                    f"dataset_kwargs:\n  data_files:\n    test: {data}\n")
    for split in SPLITS:
        for gen in (False, True):
            metric = "exact_match" if gen else "acc"
            members = "".join(f"  - {task_name(s, split, gen)}\n" for s in skills)
            put(f"{group_name(split, gen)}.yaml",
                f"group: {group_name(split, gen)}\ntask:\n{members}"
                f"aggregate_metric_list:\n  - metric: {metric}\n    aggregation: mean\n"
                f"    weight_by_size: false\nmetadata:\n  version: 1.0\n")
    return written


def load_split(task_dir: Path, skill: str, split: str) -> list[Example]:
    """Read one committed split back as :class:`Example` objects."""
    rows = [json.loads(line) for line in (Path(task_dir) / "data" / f"{skill}_{split}.jsonl").open()]
    return [Example(skill, r["prompt"], r["answer"], tuple(r["choices"]), r["label"]) for r in rows]
