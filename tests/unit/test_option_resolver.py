"""One option resolver: a policy Option passed where a value is expected resolves through
introspect.option_value, the same way in matches, kernel matches, sets and declarations."""

from __future__ import annotations

import re
from pathlib import Path

from nfhooks import Policy
from nfhooks.introspect import is_option, option_value
from nfhooks.match import Match

PACKAGE = Path(__file__).parents[2] / "nfhooks"
#: Still resolving options by hand, owned elsewhere for now (docs/architecture.md, "What is left").
PENDING: set[str] = set()


def test_an_option_resolves_to_its_value_after_set() -> None:
    p = Policy()
    port = p.option("port", default=22, type="int", help="the port")
    p.apply_overrides({"port": "2222"})
    assert is_option(port) and option_value(port) == 2222
    assert not is_option(22) and option_value(22) == 22 and option_value(None) is None


def test_matches_resolve_options_through_the_resolver() -> None:
    p = Policy()
    port, rate = p.option("port", default=22, type="int", help=""), p.option("rate", default="5/minute", help="")
    m = Match.build(proto="tcp", dport=port, limit=rate)
    assert m.describe() == Match.build(proto="tcp", dport=22, limit="5/minute").describe()


def test_no_module_checks_for_an_option_by_hand() -> None:
    pattern = re.compile(r"""hasattr\([^)]*["']option_name["']\)""")
    offenders = sorted(str(f.relative_to(PACKAGE)) for f in PACKAGE.rglob("*.py")
                       if f.name != "introspect.py" and str(f.relative_to(PACKAGE)) not in PENDING
                       and pattern.search(f.read_text()))
    assert offenders == []
