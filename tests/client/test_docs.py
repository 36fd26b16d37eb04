"""docs/usage.md and docs/operator-guide.md stay true to the code: every alert of the chart has its runbook
section (at the anchor its runbook_url points to), every dashboard row is described, the usage examples are
valid Python, and the CLI options the docs list exist."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from omnigate_client import cli

REPO = Path(__file__).resolve().parents[2]
GUIDE = (REPO / "docs" / "operator-guide.md").read_text()
USAGE = (REPO / "docs" / "usage.md").read_text()


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", markdown, re.M):
        out.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return out


def test_every_alert_has_a_runbook_section_at_its_anchor():
    rule = (REPO / "charts" / "omnigate" / "templates" / "prometheusrule.yaml").read_text()
    alerts = re.findall(r"- alert: (\w+)", rule)
    assert len(alerts) >= 4
    anchors = _anchors(GUIDE)
    for alert in alerts:
        assert f'runbook_url: {{{{ printf "%s#{alert.lower()}" . }}}}' in rule, alert
        assert alert.lower() in anchors, f"docs/operator-guide.md has no '### {alert}' section"
        section = GUIDE.split(f"### {alert}\n", 1)[1].split("\n### ", 1)[0]
        for part in ("**Fires when**", "**Diagnose**", "**Mitigate**"):
            assert part in section, (alert, part)


def test_every_dashboard_row_is_described():
    dashboard = json.loads((REPO / "charts" / "omnigate" / "dashboards" / "omnigate.json").read_text())
    rows = [p["title"] for p in dashboard["panels"] if p.get("type") == "row"]
    assert rows
    table = GUIDE.split("## Read the dashboard", 1)[1].split("\n## ", 1)[0]
    for row in rows:
        assert f"| {row} |" in table, row


def test_internal_links_resolve():
    for name, text in (("operator-guide.md", GUIDE), ("usage.md", USAGE)):
        anchors = _anchors(text)
        for target in re.findall(r"\]\(#([\w-]+)\)", text):
            assert target in anchors, (name, target)
        for target in re.findall(r"\]\(([\w.-]+\.md)\)", text):
            assert (REPO / "docs" / target).exists(), (name, target)


def test_usage_examples_are_python_and_cli_options_exist():
    blocks = re.findall(r"```python\n(.*?)```", USAGE, re.S)
    assert len(blocks) >= 4
    for block in blocks:
        ast.parse(block)
    help_text = cli._parser().format_help()
    generate_help = cli._parser()._subparsers._group_actions[0].choices["generate"].format_help()
    table = USAGE.split("## CLI", 1)[1].split("\n## ", 1)[0]
    for option in set(re.findall(r"`(--[a-z-]+)", table)):
        assert option in help_text or option in generate_help, option
