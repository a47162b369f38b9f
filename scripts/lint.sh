#!/usr/bin/env bash
# Lint and format check (ruff's rules are in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check .
ruff format --check .
lint-imports
