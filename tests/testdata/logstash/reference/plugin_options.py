"""Extract the option names of the Logstash plugins our pipelines use, from the plugins' sources.

Logstash refuses to start a pipeline that sets an unknown or obsolete option. Every plugin
declares its options with ``config :name, ...`` in its Ruby source; this script collects them
(obsolete ones apart) into ``plugins.json`` next to it.

    python tests/testdata/logstash/reference/plugin_options.py /work/.mirror

expects ``<mirror>/logstash-plugins+<plugin>/repo`` git directories. Regenerating is explicit:
run it, review the diff, commit.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
# (kind/name, repository, tag, source files)
PLUGINS = [
    ("input/beats", "logstash-input-beats", "v7.0.9", ["lib/logstash/inputs/beats.rb"]),
    ("filter/grok", "logstash-filter-grok", "v4.4.4", ["lib/logstash/filters/grok.rb"]),
    ("filter/date", "logstash-filter-date", "v3.1.15", ["lib/logstash/filters/date.rb"]),
    ("filter/json", "logstash-filter-json", "v3.2.1", ["lib/logstash/filters/json.rb"]),
    (
        "filter/fingerprint",
        "logstash-filter-fingerprint",
        "v3.5.0",
        ["lib/logstash/filters/fingerprint.rb"],
    ),
    ("output/http", "logstash-output-http", "v6.0.1", ["lib/logstash/outputs/http.rb"]),
    (
        "output/http",
        "logstash-mixin-http_client",
        "v7.5.0",
        [
            "lib/logstash/plugin_mixins/http_client.rb",
            "lib/logstash/plugin_mixins/http_client/obsolete_ssl_config_support.rb",
        ],
    ),
]
# Plugins including LogStash::PluginMixins::ECSCompatibilitySupport take `ecs_compatibility`.
ECS = {"input/beats", "filter/grok", "filter/json", "filter/fingerprint"}
# Options every plugin of a kind takes (logstash-core's LogStash::{Inputs,Filters,Outputs}::Base
# and LogStash::Plugin), as documented under "Common options" of every plugin.
COMMON = {
    "input": ["add_field", "codec", "enable_metric", "id", "tags", "type"],
    "filter": [
        "add_field",
        "add_tag",
        "enable_metric",
        "id",
        "periodic_flush",
        "remove_field",
        "remove_tag",
    ],
    "output": ["codec", "enable_metric", "id"],
}
_CONFIG = re.compile(r"^\s*(?:base\.)?config\s+:([a-z_0-9]+)(.*)$", re.M)


def main(mirror: str) -> None:
    plugins: dict[str, dict[str, list[str]]] = {}
    sources: list[str] = []
    for key, repo, tag, files in PLUGINS:
        entry = plugins.setdefault(key, {"options": [], "obsolete": []})
        for f in files:
            text = subprocess.run(
                ["git", "-C", f"{mirror}/logstash-plugins+{repo}/repo", "show", f"{tag}:{f}"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            sources.append(f"logstash-plugins/{repo}@{tag}:{f}")
            for m in _CONFIG.finditer(text):
                bucket = "obsolete" if ":obsolete" in m.group(2) else "options"
                entry[bucket].append(m.group(1))
        if key in ECS:
            entry["options"].append("ecs_compatibility")
    for entry in plugins.values():
        entry["options"] = sorted(set(entry["options"]) - set(entry["obsolete"]))
        entry["obsolete"] = sorted(set(entry["obsolete"]))
    doc = {"sources": sources, "common": COMMON, "plugins": plugins}
    (HERE / "plugins.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print("wrote plugins.json")


if __name__ == "__main__":
    main(sys.argv[1])
