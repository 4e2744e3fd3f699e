# Sourced by scripts/test: makes sure nginx is installed, for livechat-app's end-to-end proxy
# tests (tests/it/proxy.rs start their own nginx in front of the app). Installs Debian's
# `nginx-light` (or `nginx`) when missing, as root or through sudo, as scripts/cluster does.

ensure_nginx() {
  if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || [ -n "${NGINX:-}" ]; then
    echo "nginx: $( (${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)} -v) 2>&1)"
    return 0
  fi
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
      echo "nginx: missing and this user cannot install it; install Debian's nginx-light package" >&2
      return 1
    fi
  fi
  echo "nginx: installing nginx-light with apt-get"
  if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nginx-light >/dev/null; then
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nginx-light >/dev/null \
      || DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nginx >/dev/null
  fi
}
