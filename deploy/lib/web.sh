# Sourced by test.sh, demo.sh and bench.sh after install.sh: what the web
# console needs. The coordinator serves noVNC, and the browser tests drive
# Debian's chromium with puppeteer-core; both come from npm into
# deploy/web/node_modules, pinned by deploy/web/package-lock.json, and are
# never copied into the repository. chromium and node come from Debian;
# no browser is ever downloaded (puppeteer-core does not fetch one).

install_web() {
  local need=()
  command -v node >/dev/null 2>&1 || need+=(nodejs)
  command -v npm >/dev/null 2>&1 || need+=(npm)
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  install_missing ${need[@]+"${need[@]}"}
  local stamp=deploy/web/node_modules/.installed
  if [ ! -e "$stamp" ] || [ deploy/web/package-lock.json -nt "$stamp" ]; then
    echo "${0##*/}: installing noVNC and puppeteer-core (npm) into deploy/web" >&2
    (cd deploy/web && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    touch "$stamp"
  fi
}
