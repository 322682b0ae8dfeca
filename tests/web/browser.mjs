// Drives Debian's chromium, headless, over the DevTools protocol with
// puppeteer-core, for the web console tests, the demo and the benchmark.
//
// One JSON command per stdin line, one JSON answer per stdout line, so the
// caller (Rust) decides when things happen and this script only looks:
//   {"cmd":"open","page":"console","url":"https://…"}      → {"status":200,"text":"…"}
//   {"cmd":"counter","page":"console","shot":"/tmp/a.png"} → {"counter":1234,"connects":1,…}
//   {"cmd":"wait_counter","page":"console","above":1234,"connects":2,"timeout_ms":5000}
//                                                          → {"ms":812,"counter":1301,…}
//   {"cmd":"text","page":"fleet"}                          → {"text":"…"}
//   {"cmd":"wait_text","page":"fleet","contains":"…","timeout_ms":5000} → {"ms":…}
//   {"cmd":"quit"}
// Environment: FLOTILLA_WEB_DEPS (the npm prefix with puppeteer-core),
// FLOTILLA_CHROMIUM (default /usr/bin/chromium), FLOTILLA_WEB_CERT (the
// coordinator's certificate: chromium trusts exactly its public key).
import { createRequire } from 'node:module';
import { createHash, X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import path from 'node:path';

const deps = process.env.FLOTILLA_WEB_DEPS;
const require = createRequire(path.join(deps, 'package.json'));
const puppeteer = require('puppeteer-core');

const cert = new X509Certificate(readFileSync(process.env.FLOTILLA_WEB_CERT));
const spki = createHash('sha256')
  .update(cert.publicKey.export({ type: 'spki', format: 'der' }))
  .digest('base64');

const browser = await puppeteer.launch({
  executablePath: process.env.FLOTILLA_CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: [
    '--no-sandbox',
    // Trust the coordinator's key and nothing else; no certificate
    // warnings are clicked away.
    `--ignore-certificate-errors-spki-list=${spki}`,
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
});

const pages = new Map();
async function page(name) {
  if (!pages.has(name)) {
    const p = await browser.newPage();
    await p.setViewport({ width: 1024, height: 700 });
    pages.set(name, p);
  }
  return pages.get(name);
}

// Reads the counting guest's eight hex digits (row 0) by matching each cell
// against its reference strip "0123456789ABCDEF" (row 1). Runs in the page.
function readCounter() {
  // The newest connection's canvas (an old one may linger while closing).
  const c = [...document.querySelectorAll('#screen canvas')].pop();
  if (!c || c.width < 80 || c.height < 25) return null;
  const cw = Math.round(c.width / 80);
  const ch = Math.round(c.height / 25);
  const img = c.getContext('2d').getImageData(0, 0, cw * 16, ch * 2).data;
  const stride = cw * 16;
  const cell = (col, row) => {
    const bits = [];
    for (let y = 0; y < ch; y++) {
      for (let x = 0; x < cw; x++) {
        const i = ((row * ch + y) * stride + col * cw + x) * 4;
        bits.push(img[i + 1] > 128 ? 1 : 0); // green: white glyph on blue
      }
    }
    return bits;
  };
  const refs = [...Array(16).keys()].map(i => cell(i, 1));
  const distinct = new Set(refs.map(r => r.join(''))).size === 16;
  if (!distinct) return null;
  let hex = '';
  for (let col = 0; col < 8; col++) {
    const bits = cell(col, 0);
    const i = refs.findIndex(r => r.every((b, k) => b === bits[k]));
    if (i < 0) return null;
    hex += i.toString(16);
  }
  return parseInt(hex, 16);
}

async function look(p) {
  return p.evaluate(
    (read) => {
      const f = window.flotilla || {};
      return {
        counter: eval('(' + read + ')')(),
        connects: f.connects ?? 0,
        connectedAt: f.connectedAt ?? [],
        now: Date.now(),
        movedTo: f.movedTo ?? null,
        moves: f.moves ?? [],
        closes: f.closes ?? [],
        banner: document.getElementById('banner')?.textContent ?? '',
        status: document.getElementById('status')?.textContent ?? '',
      };
    },
    readCounter.toString(),
  );
}

// Polls `probe` (which returns [done, what it saw]) every 20 ms.
async function until(timeoutMs, probe) {
  const t0 = performance.now();
  for (;;) {
    const [done, seen] = await probe();
    if (done) return { ms: Math.round(performance.now() - t0), ...seen };
    if (performance.now() - t0 > timeoutMs) {
      throw new Error(`timed out after ${timeoutMs} ms; last saw ${JSON.stringify(seen)}`);
    }
    await new Promise(res => setTimeout(res, 20));
  }
}

const handlers = {
  async open({ page: name, url }) {
    const p = await page(name);
    const r = await p.goto(url, { waitUntil: 'load' });
    return { status: r.status(), url: p.url(), text: await p.evaluate(() => document.body.innerText) };
  },
  async counter({ page: name, shot }) {
    const p = await page(name);
    const seen = await look(p);
    if (shot) await p.screenshot({ path: shot });
    return seen;
  },
  async wait_counter({ page: name, above = -1, connects = 0, timeout_ms = 30000, shot }) {
    const p = await page(name);
    const r = await until(timeout_ms, async () => {
      const s = await look(p);
      return [s.counter !== null && s.counter > above && s.connects >= connects, s];
    });
    if (shot) await p.screenshot({ path: shot });
    return r;
  },
  async text({ page: name }) {
    const p = await page(name);
    return { text: await p.evaluate(() => document.body.innerText) };
  },
  async wait_text({ page: name, contains, timeout_ms = 10000, shot }) {
    const p = await page(name);
    const r = await until(timeout_ms, async () => {
      const text = await p.evaluate(() => document.body.innerText);
      return [text.includes(contains), { text: text.slice(-2000) }];
    });
    if (shot) await p.screenshot({ path: shot, fullPage: true });
    return r;
  },
  async quit() {
    await browser.close();
    process.exit(0);
  },
};

console.log(JSON.stringify({ ready: true, chromium: await browser.version() }));
for await (const line of createInterface({ input: process.stdin })) {
  let answer;
  try {
    const cmd = JSON.parse(line);
    answer = await handlers[cmd.cmd](cmd);
  } catch (e) {
    answer = { error: String(e && e.message || e) };
  }
  console.log(JSON.stringify(answer));
}
await browser.close();
