# Sourced by scripts/test and scripts/check-metrics: makes sure Prometheus's `promtool` is
# installed (Debian's `prometheus` package, which also brings the server `scripts/cluster
# --prometheus` starts). Installs it with apt-get when missing (as root, or through sudo).

ensure_promtool() {
  if command -v "${PROMTOOL:-promtool}" >/dev/null 2>&1; then
    echo "promtool: $("${PROMTOOL:-promtool}" --version 2>&1 | head -1)"
    return 0
  fi
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
      echo "promtool: missing and this user cannot install it; install Debian's prometheus package" >&2
      return 1
    fi
  fi
  echo "promtool: installing Debian's prometheus package with apt-get"
  if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null; then
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  fi
  # The package enables a service; nothing here wants a Prometheus running on its own.
  $sudo systemctl disable --now prometheus >/dev/null 2>&1 || true
}
