# Sourced by scripts/test: makes sure headless Chromium and its WebDriver are installed, for
# livechat-app's end-to-end test (tests/browser.rs). Installs Debian's `chromium` and
# `chromium-driver` packages when missing (as root, or through sudo).

ensure_browser() {
  if [ -x "${CHROMEDRIVER:-/usr/bin/chromedriver}" ] && [ -x "${CHROMIUM:-/usr/bin/chromium}" ]; then
    echo "browser: $("${CHROMIUM:-/usr/bin/chromium}" --version 2>/dev/null || echo chromium), $("${CHROMEDRIVER:-/usr/bin/chromedriver}" --version 2>/dev/null | cut -d' ' -f1-2)"
    return 0
  fi
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
      echo "browser: chromium and chromedriver are missing and this user cannot install them;" >&2
      echo "         install Debian's chromium and chromium-driver packages" >&2
      return 1
    fi
  fi
  echo "browser: installing chromium and chromium-driver with apt-get"
  if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver >/dev/null; then
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver >/dev/null
  fi
}
