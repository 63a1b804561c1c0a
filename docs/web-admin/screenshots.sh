#!/usr/bin/env bash
# Regenerates the web admin's screenshots (docs/web-admin/*.png, 1280x800): the browser
# test (crates/mailroom/tests/web_admin.rs) saves each page it visits when
# MAILROOM_SCREENSHOTS names a folder. Needs Debian's chromium and chromium-driver.
set -euo pipefail
cd "$(dirname "$0")/../.."
MAILROOM_SCREENSHOTS="$PWD/docs/web-admin" \
  cargo test -p mailroom --test web_admin -- --nocapture
ls -l docs/web-admin/*.png
