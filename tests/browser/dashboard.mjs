// Loads the gateway's live dashboard in headless Chromium, sends events to the gateway over
// HTTP, and checks that the page shows them without a reload. Run by the Rust test
// `observability::dashboard_in_headless_chromium_shows_events_arrive_live`:
//
//   node dashboard.mjs <gateway base URL> <screenshot.png>
//
// Env: CHROMIUM (default /usr/bin/chromium). Prints one JSON line with what it saw; exits 1
// with a message when a check fails.
import { chromium } from "playwright-core";

const [base, screenshot] = process.argv.slice(2);
if (!base || !screenshot) {
  console.error("usage: node dashboard.mjs <gateway URL> <screenshot.png>");
  process.exit(2);
}
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const EVENTS = 300;

function fail(message) {
  console.error(`dashboard check failed: ${message}`);
  process.exit(1);
}

const number = (text) => Number(String(text).replace(/[^0-9.]/g, ""));

const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });

  const response = await page.goto(`${base}/`, { waitUntil: "load" });
  if (!response || response.status() !== 200) fail(`GET / answered ${response && response.status()}`);
  // The first poll fills the figures in.
  await page.waitForFunction(() => document.getElementById("processed-total").textContent !== "–",
    null, { timeout: 15000 });
  const before = {
    processed: number(await page.textContent("#processed-total")),
    accepted: number(await page.textContent("#accepted-total")),
    status: await page.textContent("#system-status"),
  };
  const loads = [];
  page.on("load", () => loads.push("reload"));

  // Events go to the gateway from here (not through the page): the page must notice by itself.
  for (let i = 0; i < EVENTS; i += 50) {
    const lines = [];
    for (let j = i; j < i + 50; j++) {
      lines.push(JSON.stringify({ source: "browser-test", data: { n: j }, id: `browser-${j}` }));
    }
    const r = await fetch(`${base}/api/v1/ingest/batch`, {
      method: "POST",
      headers: { "content-type": "application/x-ndjson" },
      body: lines.join("\n"),
    });
    if (r.status !== 202) fail(`batch answered ${r.status}: ${await r.text()}`);
    await new Promise((res) => setTimeout(res, 150));
  }
  for (let i = 0; i < 20; i++) {
    const r = await fetch(`${base}/api/v1/ingest`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ source: "browser-test", data: { single: i } }),
    });
    if (r.status !== 202) fail(`single event answered ${r.status}`);
  }
  const want = before.processed + EVENTS + 20;
  await page.waitForFunction(
    (want) => Number(document.getElementById("processed-total").textContent.replace(/[^0-9]/g, "")) >= want,
    want, { timeout: 20000 },
  ).catch(async () => fail(`processed shown stayed at ${await page.textContent("#processed-total")}, want ${want}`));
  // The rates and the request latency reflect the burst within the 5 s / 10 s windows.
  await page.waitForFunction(
    () => Number(document.getElementById("rate-in").textContent.replace(/[^0-9.]/g, "")) > 0
       && document.getElementById("req-p50").textContent !== "–",
    null, { timeout: 10000 },
  ).catch(async () => fail(`rate in ${await page.textContent("#rate-in")}, request p50 ${await page.textContent("#req-p50")}`));
  // Let the chart draw a few more points, then take the picture.
  await page.waitForTimeout(2500);

  const after = {
    processed: number(await page.textContent("#processed-total")),
    accepted: number(await page.textContent("#accepted-total")),
    rateIn: await page.textContent("#rate-in"),
    rateOut: await page.textContent("#rate-out"),
    queue: await page.textContent("#queue-size"),
    workers: await page.textContent("#workers"),
    dlq: await page.textContent("#dlq-size"),
    reqP50: await page.textContent("#req-p50"),
    reqP99: await page.textContent("#req-p99"),
    e2eP50: await page.textContent("#e2e-p50"),
    e2eP99: await page.textContent("#e2e-p99"),
    status: await page.textContent("#system-status"),
    pipelines: await page.$$eval("#pipelines tbody tr",
      (rows) => rows.map((r) => ({ name: r.dataset.pipeline, in: Number(r.cells[1].textContent.replace(/[^0-9]/g, "")) }))),
    instances: await page.$$eval("#instances tbody tr",
      (rows) => rows.map((r) => ({ role: r.dataset.role, healthy: r.dataset.healthy === "true" }))),
  };
  await page.screenshot({ path: screenshot, fullPage: true });
  if (loads.length) fail("the page reloaded; it must update in place");
  if (errors.length) fail(`errors in the page: ${errors.join("; ")}`);
  if (after.accepted < before.accepted + EVENTS + 20) fail(`accepted shown ${after.accepted}`);
  // Without a config file no pipeline matches: every event counts under "(unmatched)".
  const unmatched = after.pipelines.find((p) => p.name === "(unmatched)");
  if (!unmatched || unmatched.in < EVENTS + 20) fail(`pipelines shown ${JSON.stringify(after.pipelines)}`);
  console.log(JSON.stringify({ before, after }));
} finally {
  await browser.close();
}
