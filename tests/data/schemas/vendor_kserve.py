"""Writes the KServe CRD schema parts that docker/k8s/kserve uses (see README.md here).

    python tests/data/schemas/vendor_kserve.py KSERVE_CHECKOUT [--tag v0.20.0]

reads `config/crd/full/serving.kserve.io_{servingruntimes,inferenceservices}.yaml` at the tag,
takes each CRD's `openAPIV3Schema`, drops descriptions and every property that the manifests
in docker/k8s/kserve do not use (at any depth), and writes `kserve-<tag>/<kind>.json`. Every
constraint of a kept property (type, enum, pattern, required, items, ...) stays as upstream
wrote it. A field the manifests start to use must be vendored again: the tests treat the
schema as closed (unknown fields are errors), so an unknown or misspelt field fails them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import jsonschema
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
KSERVE = ROOT / "docker" / "k8s" / "kserve"
CRDS = {
    "ServingRuntime": "config/crd/full/serving.kserve.io_servingruntimes.yaml",
    "InferenceService": "config/crd/full/serving.kserve.io_inferenceservices.yaml",
}
CHILD_KEYWORDS = ("properties", "items", "additionalProperties")


def prune(schema: dict, instances: list) -> dict:
    """`schema` without descriptions and without properties absent from all `instances`."""
    out = {k: v for k, v in schema.items() if k != "description" and k not in CHILD_KEYWORDS}
    if "properties" in schema:
        objects = [i for i in instances if isinstance(i, dict)]
        out["properties"] = {
            name: prune(sub, [o[name] for o in objects if name in o])
            for name, sub in schema["properties"].items()
            if any(name in o for o in objects)
        }
    if "items" in schema:
        elements = [e for i in instances if isinstance(i, list) for e in i]
        out["items"] = prune(schema["items"], elements)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        values = [v for i in instances if isinstance(i, dict) for v in i.values()]
        out["additionalProperties"] = prune(extra, values)
    elif extra is not None:
        out["additionalProperties"] = extra
    return out


def manifests(kind: str) -> list[dict]:
    found = []
    for path in sorted(KSERVE.glob("*.yaml")):
        found += [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == kind]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="a git clone of github.com/kserve/kserve")
    parser.add_argument("--tag", default="v0.20.0")
    args = parser.parse_args()
    git = ["git", "-C", str(args.checkout)]
    commit = subprocess.check_output([*git, "rev-parse", f"{args.tag}^{{commit}}"], text=True)
    out_dir = HERE / f"kserve-{args.tag}"
    out_dir.mkdir(exist_ok=True)
    for kind, path in CRDS.items():
        crd = yaml.safe_load(subprocess.check_output([*git, "show", f"{args.tag}:{path}"]))
        (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
        schema = version["schema"]["openAPIV3Schema"]
        instances = manifests(kind)
        for instance in instances:  # the full upstream schema accepts them
            jsonschema.validate(instance, schema)
        pruned = prune(schema, instances)
        pruned["$comment"] = (
            f"Part of the openAPIV3Schema of {crd['metadata']['name']} "
            f"{crd['spec']['group']}/{version['name']} from github.com/kserve/kserve {path} at "
            f"{args.tag} ({commit.strip()}), pruned to what docker/k8s/kserve uses by "
            f"tests/data/schemas/vendor_kserve.py"
        )
        target = out_dir / f"{kind.lower()}.json"
        target.write_text(json.dumps(pruned, indent=1, sort_keys=True) + "\n")
        print(f"{target.relative_to(ROOT)}: {target.stat().st_size} bytes")


if __name__ == "__main__":
    main()
