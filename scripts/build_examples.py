"""Build the small multi-domain sample in examples/data/ from the full preference data (permissive licenses only).

Usage: python scripts/build_examples.py --src /work/shared/data --out examples/data
"""

from __future__ import annotations

import argparse
import random
import re
import shlex
import sys
from pathlib import Path

from moerm.data.readers import load_pairs, write_jsonl
from moerm.data.schema import PreferencePair

# Only domains whose data may be redistributed under a permissive license (see each entry in SOURCES.md).
# HellaSwag is left out: its upstream is MIT, but the copy in ../shared/data carries no license file.
DOMAINS: dict[str, str] = {
    "hh_harmless": "MIT",
    "oasst1_en": "Apache-2.0",
    "alpaca_eval": "Apache-2.0",
    "newsroom": "Apache-2.0",
    "topical_chat": "MIT",
    "summeval": "Apache-2.0",
    "d2t_nlg": "Apache-2.0",
    "llmbar": "MIT",
}
# Fields of a per-domain entry in the source SOURCES.md that the attribution repeats.
_FIELDS: tuple[str, ...] = ("Data", "Repository", "Path(s)", "License", "Original fields", "How pairs were formed")


def sample_pairs(pairs: list[PreferencePair], n: int, rng: random.Random) -> list[PreferencePair]:
    """Up to `n` pairs, round-robin over prompts in random order, so the sample covers as many prompts as possible."""
    groups: dict[str, list[PreferencePair]] = {}
    for p in pairs:
        groups.setdefault(p.prompt, []).append(p)
    order = sorted(groups)  # sorted first: the result must not depend on the input file's order
    rng.shuffle(order)
    queues = [sorted(groups[k], key=lambda p: p.id) for k in order]
    for q in queues:
        rng.shuffle(q)
    out: list[PreferencePair] = []
    depth = 0
    while len(out) < n and any(depth < len(q) for q in queues):
        out += [q[depth] for q in queues if depth < len(q)][: n - len(out)]
        depth += 1
    return sorted(out, key=lambda p: p.id)


def source_entry(sources_md: str, domain: str) -> dict[str, str]:
    """The `- **Field**: text` lines of `### <domain>` in the source SOURCES.md."""
    m = re.search(rf"^### {re.escape(domain)}\n(.*?)(?=^##)", sources_md + "\n##", flags=re.S | re.M)
    if m is None:
        raise SystemExit(f"no entry for '{domain}' in SOURCES.md")
    return dict(re.findall(r"^- \*\*(.+?)\*\*: (.*)$", m.group(1), flags=re.M))


def main(argv: list[str] | None = None) -> int:
    """Sample each domain's train/test, write them gzip'd, and write SOURCES.md with attribution and counts."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=Path("/work/shared/data"))
    ap.add_argument("--out", type=Path, default=Path("examples/data"))
    ap.add_argument("--train-per-domain", type=int, default=300)
    ap.add_argument("--test-per-domain", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    sources_md = (args.src / "SOURCES.md").read_text(encoding="utf-8")
    command = "python scripts/build_examples.py " + shlex.join(
        ["--src", str(args.src), "--out", str(args.out), "--train-per-domain", str(args.train_per_domain),
         "--test-per-domain", str(args.test_per_domain), "--seed", str(args.seed)]
    )
    doc = [
        "# Example data: sources and licenses",
        "",
        f"A small sample of real preference pairs from {len(DOMAINS)} domains whose data is under a permissive license, "
        "for examples and quick tests. Schema: gzip'd JSON Lines, one pair per line with `id`, `domain`, "
        "`prompt`, `chosen`, `rejected` and optionally `subset`, `aspects_chosen`, `aspects_rejected`.",
        "",
        "The train and test files of a domain share no prompt (the full data was split by prompt). Pairs were "
        f"sampled at random (seed {args.seed}) round-robin over prompts, so that the sample covers as many "
        "distinct prompts as possible. Nothing was rewritten or relabelled.",
        "",
        "Built with:",
        "",
        f"    {command}",
        "",
    ]
    total_bytes = 0
    for domain, license_name in DOMAINS.items():
        rng = random.Random(f"{args.seed}-{domain}")  # one stream per domain: adding a domain changes no other
        entry = source_entry(sources_md, domain)
        counts: list[str] = []
        for split, n in (("train", args.train_per_domain), ("test", args.test_per_domain)):
            pairs, _ = load_pairs([args.src / domain / f"{split}.jsonl.gz"])
            chosen = sample_pairs(pairs, n, rng)
            path = write_jsonl(chosen, args.out / domain / f"{split}.jsonl.gz")
            total_bytes += path.stat().st_size
            counts.append(f"{split} {len(chosen)} pairs ({len({p.prompt for p in chosen})} prompts)")
        doc += [f"## {domain}", ""]
        doc += [f"- **{k}**: {entry[k]}" for k in _FIELDS if k in entry]
        doc += [f"- **License of this sample**: {license_name}", f"- **Written here**: {', '.join(counts)}", ""]
        print(f"{domain}: {', '.join(counts)}")
    write_text = args.out / "SOURCES.md"
    write_text.write_text("\n".join(doc), encoding="utf-8")
    print(f"wrote {args.out} ({total_bytes / 1e6:.2f} MB of data)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
