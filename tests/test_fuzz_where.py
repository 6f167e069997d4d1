"""Property-based fuzzing of the `list --where` parser and query builder (issue 12.7).

Any text either parses into conditions or raises BadQuery (one of our errors, never a
traceback from re, float or SQLite), and the conditions that parse select exactly the
versions a plain Python filter selects, with joins and with keyed lookups (more than
JOINED_METRICS metrics). The number of examples comes from the active hypothesis profile
(`make fuzz` runs a longer one); deadlines are off: no timed tests.
"""

from __future__ import annotations

import math
import operator

import pytest
from adapterhub_local.registry import open_registry
from adapterhub_local.registry.query import JOINED_METRICS, MAX_CONDITIONS, BadQuery, parse_where
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_registry import make_adapter

from adapterhub_local.cli import cli

pytestmark = pytest.mark.fuzz
# max_examples comes from the profile (tests/conftest.py: "ci" by default, "long" under `make fuzz`)
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                      HealthCheck.too_slow])
KEYS = [f"m{i}" for i in range(JOINED_METRICS + 8)] + ["rank", "alpha", "version", "missing"]
OPS = ["<", "<=", ">", ">=", "=", "==", "!="]
PY = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "=": operator.eq,
      "!=": operator.ne}
NUMBERS = st.one_of(
    st.integers(-5, 45).map(str),
    st.integers(-50, 400).map(str),
    st.floats(allow_nan=False).map(repr),
    st.sampled_from(["inf", "-inf", "1e999", "-0", "0.5", "1_0", "+3", ".5", "5.", "1e-320", "١٢"]),
)
# the near-misses that exercise every branch of the parser
NOISE = st.sampled_from(["nan", "NaN", "x", "", "<", "and", "&&", "1.2.3", "0x10", "--1", "\x00", "\u202e"])


@st.composite
def condition_text(draw) -> str:
    key = draw(st.sampled_from(KEYS)) if draw(st.integers(0, 4)) else draw(
        st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-/]{0,8}", fullmatch=True))
    op = draw(st.sampled_from(OPS))
    value = draw(NUMBERS | NOISE) if draw(st.integers(0, 9)) == 0 else draw(NUMBERS)
    pad = draw(st.sampled_from(["", " ", "  ", "\t"]))
    return f"{pad}{key}{pad}{op}{pad}{value}{pad}"


@st.composite
def many_keys(draw) -> list[str]:
    """More distinct metrics than the joins take, mostly permissive: rows are selected."""
    keys = draw(st.lists(st.integers(0, JOINED_METRICS + 7), min_size=JOINED_METRICS + 1,
                         max_size=JOINED_METRICS + 8, unique=True))
    picky = draw(st.sets(st.sampled_from(keys), max_size=3))
    if draw(st.booleans()):  # the picky ones last: past the join budget, as keyed lookups
        keys = [k for k in keys if k not in picky] + [k for k in keys if k in picky]
    return [f"m{k}{draw(st.sampled_from(OPS))}{k + draw(st.integers(-5, 35))}" if k in picky else f"m{k}>=-1e9"
            for k in keys]


@st.composite
def where_texts(draw) -> list[str]:
    if draw(st.booleans()):
        parts = draw(many_keys())
    else:
        parts = draw(st.lists(condition_text(), min_size=1, max_size=4))
    joiner = draw(st.sampled_from([" and ", " AND ", "&&", " && ", "  and\t"]))
    split = draw(st.integers(1, len(parts)))
    return [joiner.join(parts[:split]), *parts[split:]]


@FUZZ
@given(st.lists(st.text(max_size=200), max_size=4) | where_texts())
def test_parse_where_returns_conditions_or_bad_query(texts):
    try:
        conds = parse_where(texts)
    except BadQuery as e:
        assert str(e) and "\n" not in str(e)
        return
    assert len(conds) <= MAX_CONDITIONS
    for c in conds:
        assert c.op in PY and not math.isnan(c.value)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Four versions; version i has metric m_k = 10·i + k for every k < JOINED_METRICS + 4, and
    for the last four k only when k ≡ i (mod 2): a missing metric never matches."""
    root = tmp_path_factory.mktemp("fuzzreg")
    reg = open_registry(root / "home")
    expected = {}
    for i in range(4):
        metrics = {f"m{k}": 10.0 * i + k for k in range(JOINED_METRICS + 8)
                   if k < JOINED_METRICS + 4 or k % 2 == i % 2}
        rec = reg.register(make_adapter(root / f"a{i}", seed=i, r=2 + 2 * i, alpha=4 * (i + 1)),
                           f"ad{i}", metrics=metrics)
        expected[rec.id] = {**metrics, "rank": rec.rank, "alpha": rec.alpha, "version": rec.version}
    yield reg, expected
    reg.close()


def _holds(values: dict, conds) -> bool:
    return all(c.key in values and PY[c.op](values[c.key], c.value) for c in conds)


@FUZZ
@given(where_texts())
def test_where_selects_what_python_selects(registry, texts):
    reg, expected = registry
    try:
        conds = parse_where(texts)
    except BadQuery:
        event("refused")
        return
    got = {r.id for r in reg.list(where=texts, limit=None)}
    event(f"{len(got)} of 4 selected")
    event("keyed lookups" if len({c.key for c in conds} - {"rank", "alpha", "version"}) > JOINED_METRICS
          else "joins only")
    assert got == {vid for vid, values in expected.items() if _holds(values, conds)}, [str(c) for c in conds]


@FUZZ
@given(st.text(max_size=300))
def test_cli_where_is_a_result_or_one_error(registry, text):
    reg, _ = registry
    res = CliRunner().invoke(cli, ["--registry", str(reg.home), "list", "--where", text, "--json"])
    if res.exit_code == 0:
        return
    assert isinstance(res.exception, BadQuery), repr(res.exception)  # main() prints it as one line
