# Sourced by scripts/test and scripts/umadb: makes sure `protoc` is installed. UmaDB's client
# (benches' `umadb` feature, the peer of `compare --dcb --peer umadb`) generates its gRPC code
# with it at build time. Installs Debian's protobuf-compiler when missing, as root or through
# sudo, as scripts/nginx.sh does for nginx.

ensure_protoc() {
  if command -v protoc >/dev/null 2>&1 || [ -n "${PROTOC:-}" ]; then
    echo "protoc: $(${PROTOC:-protoc} --version)"
    return 0
  fi
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
      echo "protoc: missing and this user cannot install it; install Debian's protobuf-compiler" >&2
      return 1
    fi
  fi
  echo "protoc: installing protobuf-compiler with apt-get"
  if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq protobuf-compiler >/dev/null; then
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq protobuf-compiler >/dev/null
  fi
}
