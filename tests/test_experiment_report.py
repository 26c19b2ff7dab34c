"""The report of a comparison run as parts: merging the parts' results, the main tables' rows,
the seeds and "what mattered" sections (hand-made results, no training)."""

import copy
import glob
import json
import math
import os

import ml_collections

from pn_jax import experiment_report as report
from pn_jax.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B = 1_000_000
R = "PN (random codes)"  # gpu_small's label for pn: its PN rows were run with random codes
DOMAINS = ("legal", "religious")


def _cell(ppl, capped=False):
  return {"test_ppl": ppl, "noft_test_ppl": 3 * ppl, "specialize_flops": 1.0,
          "fit_seconds": 1.0, "steps": 100, "hit_step_cap": capped,
          "best_valid_loss": math.log(2 * math.sqrt(ppl))}  # validation ppl: 2 sqrt(test ppl)


def _part(ppls: dict, reference="", capped=()) -> dict:
  """One experiment root's results: {method: {domain: test ppl}}; generic ppl 100 + the first
  domain's ppl; equal time: every method's final checkpoint against `reference`."""
  spec = {}
  for m, by_domain in ppls.items():
    for d, ppl in by_domain.items():
      spec.setdefault(f"{d}/{B}", {})[m] = _cell(ppl, (m, d) in capped)
  pre = {m: {"flops": 1e12, "seconds": 10.0, "train_seconds": 9.0, "steps": 4,
             "generic_valid_ppl": 100.0 + next(iter(p.values()))} for m, p in ppls.items()}
  timed = {"reference": reference, "budget_seconds": 9.0, "methods": {
      m: {"step": 4, "final": True, "seconds": 9.0, "flops": 1e12, "generic_valid_ppl": 1.0,
          "over_budget": False} for m in ppls}} if reference else {}
  return {"pretrain": pre, "specialize": spec, "equal_time": timed,
          "domain_train_tokens": {d: 2 * B for d in DOMAINS}, "exp": {"part": reference}}


MAIN = _part({"slm": dict(legal=10.0, religious=20.0), "pn": dict(legal=9.0, religious=22.0)},
             reference="slm")
SEEDS = _part({"slm_s1": dict(legal=12.0, religious=18.0),
               "pn_s1": dict(legal=11.0, religious=16.0)}, reference="slm_s1")
HYPOTHESES = _part({"pn_h8": dict(legal=8.0, religious=19.0), "slm_30M": dict(legal=25.0),
                    "pn_30M": dict(legal=30.0, religious=40.0), "pn_k16": dict(legal=5.0)},
                   capped={("pn_h8", "legal")})


def _exp():
  """gpu_small's main part on two domains, its hypotheses in a chosen (unsorted) order."""
  exp = load_config(os.path.join(REPO, "configs/experiments/gpu_small.py"))
  exp.domains, exp.budgets = DOMAINS, (B,)
  exp.hypotheses = ml_collections.ConfigDict(dict(
      pn=("none", "slm"), pn_h8=("a third of the basis", "slm"),
      pn_30M=("a quarter of the tokens", "slm_30M"), pn_k16=("16 experts", "slm"),
      pn_lowest_loss=("lowest-loss expert", "slm")), sort_keys=False)
  return exp


def _merged():
  return report.merge_results(MAIN, [SEEDS, HYPOTHESES])


def test_a_method_run_again_in_two_parts_takes_every_cell_from_one_run():
  """A part run again (the first try stopped after legal) and its complete rerun: the rerun
  listed first wins every cell, and listed last it fills none of the first run's gaps (two
  pretraining runs never mix in one method's macro)."""
  stopped = _part({"pn_x": dict(legal=7.0)})
  rerun = _part({"pn_x": dict(legal=8.0, religious=18.0)})
  first = report.merge_results(MAIN, [rerun, stopped])
  assert [first["specialize"][f"{d}/{B}"]["pn_x"]["test_ppl"] for d in DOMAINS] == [8.0, 18.0]
  last = report.merge_results(MAIN, [stopped, rerun])
  assert last["specialize"][f"legal/{B}"]["pn_x"]["test_ppl"] == 7.0
  assert "pn_x" not in last["specialize"][f"religious/{B}"]
  assert set(last["specialize"][f"religious/{B}"]) == {"slm", "pn"}


def test_merge_is_the_union_of_the_parts_and_the_primary_wins_a_clash():
  clash = copy.deepcopy(SEEDS)
  clash["specialize"][f"legal/{B}"]["slm"] = _cell(99.0)
  clash["pretrain"]["slm"] = {"flops": 0.0}
  clash["equal_time"]["methods"]["slm"] = {"step": 1}
  before = copy.deepcopy([MAIN, clash])
  merged = report.merge_results(MAIN, [clash, HYPOTHESES])
  assert [MAIN, clash] == before  # inputs untouched
  assert set(merged["specialize"][f"legal/{B}"]) == {"slm", "pn", "slm_s1", "pn_s1", "pn_h8",
                                                     "slm_30M", "pn_30M", "pn_k16"}
  assert set(merged["specialize"][f"religious/{B}"]) == {"slm", "pn", "slm_s1", "pn_s1",
                                                         "pn_h8", "pn_30M"}
  assert merged["specialize"][f"legal/{B}"]["slm"]["test_ppl"] == 10.0
  assert merged["pretrain"]["slm"] == MAIN["pretrain"]["slm"]
  assert set(merged["pretrain"]) == {"slm", "pn", "slm_s1", "pn_s1", "pn_h8", "slm_30M",
                                     "pn_30M", "pn_k16"}
  assert merged["exp"] == MAIN["exp"]
  eq = merged["equal_time"]
  assert (eq["reference"], eq["budget_seconds"]) == ("slm", 9.0)
  assert {m: e["reference"] for m, e in eq["methods"].items()} == {
      "slm": "slm", "pn": "slm", "slm_s1": "slm_s1", "pn_s1": "slm_s1"}
  assert eq["methods"]["slm"]["step"] == 4
  merged["specialize"][f"legal/{B}"]["pn"]["test_ppl"] = 1.0  # a copy, not the parts' dicts
  assert MAIN["specialize"][f"legal/{B}"]["pn"]["test_ppl"] == 9.0


def test_labels_come_from_the_config_first():
  exp = _exp()
  assert report.label("pn_h8", exp) == "PN h=8 m=8" and report.label("slm", exp) == "SLM"
  exp.labels.pn = "PN (ours)"
  assert report.label("pn", exp) == "PN (ours)" and report.label("pn") == "PN"
  assert report.label("pn_h8") == "pn_h8"


def test_main_tables_hold_the_seed_runs_but_not_the_hypothesis_variants():
  rows = report.table_rows(_merged(), _exp())
  methods = [r["method"] for r in rows]  # then the seed groups' members, in the config's order
  assert methods[:2] == ["slm", "pn"] and set(methods) == {"slm", "pn", "slm_s1", "pn_s1"}
  lines, _ = report.view_section(_merged(), _exp(), "time")
  assert any(line.startswith("| PN (seed 1) | 4 (final) (vs SLM (seed 1)) |") for line in lines)
  assert any(line.startswith("| PN (random codes) | 4 (final) | ") for line in lines)


def test_seed_tables_give_each_group_its_mean_and_pair_the_seeds():
  results, exp = _merged(), _exp()
  slm_mean, pn_mean = (10 * 20 * 12 * 18) ** 0.25, (9 * 22 * 11 * 16) ** 0.25
  table = report.seed_table(results, exp, B)
  assert (f"| SLM | SLM / SLM (seed 1) | 110.00 / 112.00 | {math.sqrt(200):.2f} / "
          f"{math.sqrt(216):.2f} | {slm_mean:.2f} |") in table
  assert (f"| {R} | {R} / PN (seed 1) | 109.00 / 111.00 | 14.07 / 13.27 | {pn_mean:.2f} |"
          in table)
  pairs = report.seed_pairs_table(results, exp, B)
  assert f"| PN (random codes) vs SLM | {100 * (math.sqrt(198 / 200) - 1):+.1f}% | 1/2 |" in pairs
  assert "| PN (seed 1) vs SLM (seed 1) | -9.7% | 2/2 |" in pairs  # 11 < 12, 16 < 18
  assert f"| {R} vs SLM, means of 2 / 2 | {100 * (pn_mean / slm_mean - 1):+.1f}% | - |" in pairs
  assert report.seeds_section(MAIN, exp) == []  # one run per group: no section
  partial = copy.deepcopy(results)  # a stopped run: pn_s1 without its religious cell
  del partial["specialize"][f"religious/{B}"]["pn_s1"]
  pairs = report.seed_pairs_table(partial, exp, B)
  assert "| PN (seed 1) vs SLM (seed 1) | -8.3% | 1/1 |" in pairs  # 11 vs 12, legal alone
  assert (f"| {R} vs SLM, means of 2 / 2, 1 of 2 domains | "
          f"{100 * (math.sqrt(9 * 11 / (10 * 12)) - 1):+.1f}% | - |") in pairs
  exp.recipe_baseline = "pn"  # a change against the default it changes, seed by seed
  exp.seed_groups.pn_alt = ("pn_s1", "pn")  # (members swapped: each is the other's change)
  lines = report.seeds_section(results, exp)
  assert "| PN (seed 1) vs PN (random codes) | " + f"{100 * (math.sqrt(176 / 198) - 1):+.1f}%" \
      + " | 1/2 |" in lines
  assert not any(line.startswith("| SLM vs") for line in lines)  # the SLM is no change of PN
  with exp.ignore_type():  # several baselines: a table against each, in order
    exp.recipe_baseline = ("pn", "pn_alt")
  both = report.seeds_section(results, exp)
  heads = [line for line in both if line.startswith("Each method against")]
  assert heads == [f"Each method against {R} of the same seed: a change counts only where both "
                   "seeds agree.", "Each method against pn_alt of the same seed: a change "
                   "counts only where both seeds agree."]


def test_what_mattered_rows_compare_each_variant_with_its_reference():
  table = report.hypotheses_table(_merged(), _exp())
  pn, h8, q, k16 = table[2:]  # config order; pn_lowest_loss (no cell): no row
  assert pn == ("| PN (random codes) | none | SLM | 109.00 | - | 42.21 | 14.07 | -0.3% | -0.5% "
                "| 1/2 |")  # valid: (198 / 200) ** (1 / 4), test: (198 / 200) ** (1 / 2)
  # pn_h8 (8, 19) vs the SLM's (10, 20); its legal cell hit the step cap
  valid, test = (f"{100 * ((152 / 200) ** e - 1):+.1f}%" for e in (0.25, 0.5))
  assert h8 == (f"| PN h=8 m=8 | a third of the basis | SLM | 108.00 | - | "
                f"{3 * math.sqrt(152):.2f} | {math.sqrt(152):.2f}* | {valid} | {test} | 2/2 |")
  # the SLM at 30M tokens has only its legal cell: compared there alone
  assert q.endswith(f"| {math.sqrt(1200):.2f} | +9.5% | +20.0% | 0/1 |")
  assert q.startswith("| PN, 30M tokens | a quarter of the tokens | SLM, 30M tokens |")
  # pn_k16 has one of the two domains: compared on it, no macro over a partial set
  assert k16 == "| PN k=16 | 16 experts | SLM | 105.00 | - | - | - | -29.3% | -50.0% | 1/1 |"
  exp = _exp()
  exp.hypotheses.pn_h8 = ("a third of the basis", ("slm", "pn"))  # a row per reference
  rows = [r for r in report.hypotheses_table(_merged(), exp) if r.startswith("| PN h=8 m=8 |")]
  assert [r.split(" | ")[2] for r in rows] == ["SLM", R]
  assert report.hypotheses_table(MAIN, ml_collections.ConfigDict(
      dict(domains=DOMAINS, budgets=(B,), finetune=dict(steps=100)))) == []


def test_write_report_adds_the_sections_after_the_views(tmp_path):
  report.write_report(_merged(), _exp(), str(tmp_path), "pytest", tag="t", figure="t.png")
  text = (tmp_path / "results.md").read_text()
  order = ["#### equal pretraining tokens", "#### equal pretraining device time",
           "#### seeds", "#### what mattered", "fine-tuning hit the step cap"]
  assert [text.index(s) for s in order] == sorted(text.index(s) for s in order)
  assert text.count("| PN h=8 m=8 |") == 1 and "ft 8e+06" not in text  # no domain holds 8M
  report.write_report(_merged(), _exp(), str(tmp_path), "pytest", tag="t", figure="t.png")
  assert (tmp_path / "results.md").read_text() == text  # rewritten between its markers


def test_a_config_without_parts_renders_as_before(tmp_path):
  """cpu_small (no labels, seed groups or hypotheses): its tables as docs/results.md has them."""
  with open(os.path.join(REPO, "docs/results_data/exp_cpu_small.json")) as f:
    results = json.load(f)
  exp = load_config(os.path.join(REPO, "configs/experiments/cpu_small.py"))
  report.write_report(results, exp, str(tmp_path), "pytest", tag="exp_cpu_small", figure="t.png")
  def tables(text):  # the exp_cpu_small block's tables (docs/results.md holds several blocks)
    text = text[text.index("<!-- experiment exp_cpu_small:begin"):]
    return text[text.index("#### equal pretraining tokens"):text.index("![ppl vs cost]")]
  with open(os.path.join(REPO, "docs/results.md")) as f:
    assert tables((tmp_path / "results.md").read_text()) == tables(f.read())


def test_paper_section_puts_the_papers_table_8_beside_ours():
  """At the paper's budgets (1M, 8M) the report sets our equal-token numbers beside Table 8's
  (100 GPUh) with each method's change vs the SLM in both; at other budgets it says nothing."""
  exp = _exp()
  exp.budgets = (B, 8 * B)
  results = copy.deepcopy(MAIN)
  results["domain_train_tokens"] = {d: 9 * B for d in DOMAINS}
  for m, ppl in (("slm", 10.0), ("pn", 9.0)):
    for d in DOMAINS:
      results["specialize"][f"{d}/{8 * B}"] = dict(results["specialize"].get(f"{d}/{8 * B}", {}),
                                                   **{m: _cell(ppl)})
  rows = report.table_rows(results, exp)
  table = report.paper_section(results, rows, exp)
  slm, pn = [line for line in table if line.startswith(("| SLM |", "| PN (random codes) |"))]
  assert slm.startswith("| SLM | 110.00 | 42.43 | 14.14 | 10.00 | +0.0% / +0.0% | 20.51 |")
  assert pn.startswith(f"| {R} | 109.00 | 42.21 | 14.07 | 9.00 | -0.5% / -10.0% | 18.90 |")
  assert pn.endswith(f"| {100 * (18.57 / 19.31 - 1):+.1f}% / {100 * (15.58 / 15.61 - 1):+.1f}% |")
  exp.budgets = (B,)
  assert report.paper_section(results, report.table_rows(results, exp), exp) == []


def test_the_published_results_pass_the_load_check_and_a_damaged_cell_does_not():
  """check_results (what the driver applies to every results.json it reads) accepts each
  results.json behind docs/results.md, and names the first record the report could not read."""
  paths = sorted(glob.glob(os.path.join(REPO, "docs", "results_data", "exp_*.json")))
  assert len(paths) >= 5
  for path in paths:
    with open(path) as f:
      results = json.load(f)
    assert report.check_results(results) == "", path
  cell, method = next((c, m) for c, ms in results["specialize"].items() for m in ms)
  del results["specialize"][cell][method]["fit_seconds"]
  assert report.check_results(results) == (f"has a malformed record: specialize[{cell!r}]"
                                            f"[{method!r}] lacks fit_seconds")
  results["pretrain"] = {"slm": {"flops": True, "seconds": 1.0}}
  assert report.check_results(results) == ("has a malformed record: pretrain['slm'] has "
                                            "flops=True, not a number")


def test_a_null_number_reads_back_as_nan():
  """A diverged cell's perplexity is non-finite; results.json holds it as null (strict JSON), and
  the check reads it back as the NaN it was instead of calling the file damaged."""
  path = sorted(glob.glob(os.path.join(REPO, "docs", "results_data", "exp_*.json")))[0]
  with open(path) as f:
    results = json.load(f)
  cell, method = next((c, m) for c, ms in results["specialize"].items() for m in ms)
  results["specialize"][cell][method]["test_ppl"] = None
  assert report.check_results(results) == ""
  assert math.isnan(results["specialize"][cell][method]["test_ppl"])
  results["specialize"][cell][method]["steps"] = "12"
  assert "steps='12', not a number" in report.check_results(results)


def test_figures_draw_every_method_once_in_a_distinct_style(tmp_path):
  """A seed group is one series (its mean, the seeds' range as error bars), every series has its
  own colour and marker pair, and the % vs SLM bars leave the SLM out."""
  from pn_jax import experiment_figures as figures
  pairs = figures.styles([f"m{i}" for i in range(25)])
  assert len(set(pairs.values())) == 25
  exp = _exp()
  exp.figure_methods = ("slm", "pn", "pn_h8", "slm_s1")  # slm_s1: drawn within its group
  results = _merged()
  assert figures.figure_groups(results, exp) == {"slm": ["slm", "slm_s1"], "pn": ["pn", "pn_s1"],
                                                 "pn_h8": ["pn_h8"]}
  assert figures.cost_figure(results, exp, str(tmp_path / "f.png")) == ["slm", "pn", "pn_h8"]
  assert figures.gain_figure(results, exp, str(tmp_path / "g.png")) == ["pn", "pn_h8"]
  assert (tmp_path / "f.png").stat().st_size > 0 and (tmp_path / "g.png").stat().st_size > 0
  # PN's group (pn 9 / 22, pn_s1 11 / 16) against the SLM's (10 / 20, 12 / 18), per domain
  change = figures.per_domain_change(results, exp, ["pn", "pn_s1"], ["slm", "slm_s1"], B)
  assert math.isclose(change["legal"], 100 * (math.sqrt(99) / math.sqrt(120) - 1))
