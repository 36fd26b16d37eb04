#!/usr/bin/env python3
"""Writes the `gateway.config` and `worker.config` parts of charts/omnigate/values.schema.json from the
services' settings classes, so that the chart accepts every OMNIGATE_* setting by its real name and type
and rejects anything else.

    python charts/tools/sync_config_schema.py          # rewrite the schema (`make chart-schema`)
    python charts/tools/sync_config_schema.py --check  # exit 1 when the schema is out of date

Settings the chart derives itself (addresses, ports, the worker target, the model, the drain time) are
left out: values.yaml sets them through `ports`, `drain` and `model`.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path

SCHEMA = Path(__file__).resolve().parents[1] / "omnigate" / "values.schema.json"

# Settings rendered by the chart from other values, never taken from `config`.
CHART_OWNED = {
    "gateway": {
        "host",
        "port",
        "metrics_host",
        "metrics_port",
        "http_host",
        "http_port",
        "worker_target",
        "grace_period_s",
        "ports_file",
    },
    "worker": {"model", "host", "port", "metrics_host", "metrics_port", "grace_period_s", "ports_file"},
}

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _json_type(annotation) -> str:
    """JSON schema type of a settings field (Optional[X] counts as X: unset means "leave the default")."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    return _JSON_TYPES[annotation]


def settings_classes() -> dict:
    from omnigate_gateway.settings import GatewaySettings
    from omnigate_worker.settings import WorkerSettings

    return {"gateway": GatewaySettings, "worker": WorkerSettings}


def config_schema(component: str, settings_class) -> dict:
    properties = {}
    for name, field in settings_class.model_fields.items():
        if name in CHART_OWNED[component]:
            continue
        prop = {"type": _json_type(field.annotation)}
        if prop["type"] == "number":
            # Helm reads every YAML number as a float; an integer is a valid number.
            prop = {"type": "number"}
        if field.description:
            prop["description"] = field.description
        if field.default is not None:
            prop["default"] = field.default
        properties[name] = prop
    prefix = f"OMNIGATE_{component.upper()}_"
    return {
        "type": "object",
        "description": f"{prefix}* settings by name in lower case (the chart sets "
        + ", ".join(sorted(CHART_OWNED[component]))
        + " itself).",
        "additionalProperties": False,
        "properties": properties,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether the schema is up to date")
    args = parser.parse_args(argv)
    schema = json.loads(SCHEMA.read_text())
    stale = []
    for component, cls in settings_classes().items():
        wanted = config_schema(component, cls)
        current = schema["properties"][component]["properties"].get("config")
        if current != wanted:
            stale.append(component)
            schema["properties"][component]["properties"]["config"] = wanted
    if args.check:
        if stale:
            print(
                f"values.schema.json: {', '.join(stale)}.config does not match the settings classes; "
                "run `make chart-schema`",
                file=sys.stderr,
            )
            return 1
        return 0
    SCHEMA.write_text(json.dumps(schema, indent=2) + "\n")
    print(f"{SCHEMA}: {'updated ' + ', '.join(stale) if stale else 'up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
