"""Generate ``gears_reference_splits.json``: GEARS' own simulation splits for small condition lists.

This script is NOT run by the tests. It needs real GEARS, which the pipeline's venv does not have
(GEARS pulls in torch, torch_geometric and scanpy). It was run in a throwaway venv:

    python3 -m venv /tmp/gears_venv
    /tmp/gears_venv/bin/pip install torch==2.13.0          # CPU wheel
    /tmp/gears_venv/bin/pip install cell-gears torch_geometric
    /tmp/gears_venv/bin/python tests/data/make_gears_reference.py

For each case it builds an AnnData whose ``obs['condition']`` holds GEARS labels ('A+ctrl' or
'ctrl+A' for singles, 'A+B' for combos, 'ctrl' for the control) and calls exactly what
``PertData.prepare_split(split='simulation', seed=...)`` calls:

    DataSplitter(adata, split_type='simulation').split_data(
        train_gene_set_size=..., combo_seen2_train_frac=..., seed=...,
        test_perts=None, only_test_set_perts=False)

and records, per condition, GEARS' split (train/val/test) and subgroup (from the returned
``test_subgroup`` for test rows, ``val_subgroup`` for val rows, null for train rows and ctrl).
As a sanity check it also reruns every case on a shuffled condition order and requires the same
result.

Cases:
  * demo_norman19_seed{42,1}: the norman19 conditions of resources/demo/perturbench_devel.h5ad
    (hard-coded below so this script needs no repo files), single 'X' -> 'X+ctrl',
    'control' -> 'ctrl'; ``demo_label`` keeps the original label.
  * synthetic_norman_seed{42,1}: 60 genes G01..G60, each with a single (about a third written
    'ctrl+X' as Norman does), plus 60 distinct random pairs (random orientation), rng seed 0.
  * synthetic_combo_only_genes_seed7: the same plus 6 combos over genes G61..G64 that have no
    single, with train_gene_set_size 0.6 and combo_seen2_train_frac 0.5.
"""

from __future__ import annotations

import datetime
import json
import random
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

import gears
from gears.data_utils import DataSplitter

try:
    from importlib.metadata import version as _dist_version

    GEARS_VERSION = _dist_version("cell-gears")
except Exception:  # pragma: no cover
    GEARS_VERSION = getattr(gears, "__version__", "unknown")

OUT = Path(__file__).with_name("gears_reference_splits.json")

# sorted(a.obs.condition.unique()) for a = perturbench_devel.h5ad restricted to dataset == 'norman19'
DEMO_NORMAN19 = [
    "BPGM+SAMD1", "CBL+CNN1", "CEBPE+RUNX1T1", "CNN1+MAPK1", "FOXL2+HOXB9", "FOXO4", "HK2",
    "IER5L", "KLF1", "KLF1+MAP2K6", "KLF1+TGFBR2", "KMT2A", "MAP2K3", "MAP2K3+MAP2K6",
    "MAP2K3+SLC38A2", "MAP2K6", "MAP3K21", "MAP4K3", "MAP4K5", "MAPK1", "MAPK1+TGFBR2", "MIDN",
    "NIT1", "PLK4", "PTPN12+PTPN9", "SAMD1+PTPN12", "SET+KLF1", "SGK1", "SGK1+TBX3", "SLC38A2",
    "TGFBR2", "TMSB4X", "ZBTB10+PTPN12", "control",
]


def demo_to_gears(label: str) -> str:
    if label == "control":
        return "ctrl"
    return label if "+" in label else f"{label}+ctrl"


def synthetic_norman(rng_seed: int = 0, n_genes: int = 60, n_pairs: int = 60) -> list[str]:
    rng = random.Random(rng_seed)
    genes = [f"G{i:02d}" for i in range(1, n_genes + 1)]
    singles = [f"ctrl+{g}" if rng.random() < 1 / 3 else f"{g}+ctrl" for g in genes]
    pairs: set[frozenset] = set()
    combos = []
    while len(combos) < n_pairs:
        a, b = rng.sample(genes, 2)
        key = frozenset((a, b))
        if key in pairs:
            continue
        pairs.add(key)
        combos.append(f"{a}+{b}")
    conditions = ["ctrl"] + singles + combos
    rng.shuffle(conditions)
    return conditions


def synthetic_combo_only() -> list[str]:
    extra = ["G61+G01", "G02+G61", "G62+G63", "G63+G10", "G64+G61", "G20+G64"]
    conditions = synthetic_norman() + extra
    random.Random(1).shuffle(conditions)
    return conditions


def run_gears(conditions: list[str], seed: int, tgss: float, c2tf: float) -> dict[str, dict]:
    # two cells per condition, as in real data; obs order = the given condition order
    obs = pd.DataFrame({"condition": [c for c in conditions for _ in range(2)]})
    obs.index = [f"cell{i}" for i in range(len(obs))]
    adata = ad.AnnData(X=np.zeros((len(obs), 1), dtype=np.float32), obs=obs)
    splitter = DataSplitter(adata, split_type="simulation")
    adata, subgroup = splitter.split_data(
        train_gene_set_size=tgss,
        combo_seen2_train_frac=c2tf,
        seed=seed,
        test_perts=None,
        only_test_set_perts=False,
    )
    split_of = adata.obs.groupby("condition", observed=True)["split"].agg(lambda s: sorted(set(s)))
    result = {}
    for cond, splits in split_of.items():
        assert len(splits) == 1 and isinstance(splits[0], str), (cond, splits)
        split = splits[0]
        sub = None
        if split in ("test", "val"):
            groups = subgroup[f"{split}_subgroup"]
            hits = [g for g, members in groups.items() if cond in [str(m) for m in members]]
            assert len(hits) == 1, (cond, split, hits)
            sub = hits[0]
        result[str(cond)] = {"split": split, "subgroup": sub}
    assert set(result) == set(conditions)
    return result


def dump_compact(header: dict, cases: list[dict]) -> str:
    """Valid JSON, one line per condition, so the fixture stays small and diffable."""
    d = json.dumps
    lines = ["{", ' "header": ' + d(header, indent=2).replace("\n", "\n ") + ",", ' "cases": [']
    for i, case in enumerate(cases):
        lines.append("  {")
        for key, value in case.items():
            if key in ("expected", "demo_label"):
                lines.append(f"   {d(key)}: {{")
                items = list(value.items())
                for j, (k, v) in enumerate(items):
                    lines.append(f"    {d(k)}: {d(v)}" + ("," if j < len(items) - 1 else ""))
                lines.append("   },")
            else:
                lines.append(f"   {d(key)}: {d(value)},")
        lines[-1] = lines[-1].rstrip(",")
        lines.append("  }" + ("," if i < len(cases) - 1 else ""))
    lines += [" ]", "}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    cases = []
    specs = [
        ("demo_norman19_seed42", "demo", 42, 0.75, 0.75),
        ("demo_norman19_seed1", "demo", 1, 0.75, 0.75),
        ("synthetic_norman_seed42", "synthetic", 42, 0.75, 0.75),
        ("synthetic_norman_seed1", "synthetic", 1, 0.75, 0.75),
        ("synthetic_combo_only_genes_seed7", "synthetic_combo_only", 7, 0.6, 0.5),
    ]
    for name, kind, seed, tgss, c2tf in specs:
        if kind == "demo":
            demo_labels = list(DEMO_NORMAN19)
            conditions = [demo_to_gears(c) for c in demo_labels]
        elif kind == "synthetic":
            demo_labels = None
            conditions = synthetic_norman()
        else:
            demo_labels = None
            conditions = synthetic_combo_only()
        expected = run_gears(conditions, seed, tgss, c2tf)
        shuffled = list(conditions)
        random.Random(123).shuffle(shuffled)
        assert run_gears(shuffled, seed, tgss, c2tf) == expected, f"{name}: GEARS is order dependent"
        case = {
            "name": name,
            "seed": seed,
            "train_gene_set_size": tgss,
            "combo_seen2_train_frac": c2tf,
            "control_label": "ctrl",
            "conditions": conditions,
            "expected": {c: expected[c] for c in conditions},
        }
        if demo_labels is not None:
            case["demo_control_label"] = "control"
            case["demo_label"] = dict(zip(conditions, demo_labels))
        cases.append(case)
        counts = pd.Series([v["split"] + ":" + str(v["subgroup"]) for v in expected.values()]).value_counts()
        print(name, dict(counts), file=sys.stderr)

    header = {
        "generated_by": "tests/data/make_gears_reference.py",
        "gears_package": f"cell-gears {GEARS_VERSION} (PyPI; gears/data_utils.py)",
        "function": (
            "gears.data_utils.DataSplitter(adata, split_type='simulation').split_data("
            "train_gene_set_size=..., combo_seen2_train_frac=..., seed=..., test_perts=None, "
            "only_test_set_perts=False), i.e. what PertData.prepare_split(split='simulation', seed=...) calls"
        ),
        "numpy_version": np.__version__,
        "python_version": sys.version.split()[0],
        "date": datetime.date.today().isoformat(),
        "subgroup_convention": "test rows: test_subgroup key; val rows: val_subgroup key; train rows and ctrl: null",
    }
    OUT.write_text(dump_compact(header, cases))
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
