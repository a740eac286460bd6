// Drives tether's status page in Debian's Chromium for tests/tests/it/status_page.rs: one command per stdin line,
// one answer per stdout line ("ok <detail>" or "fail <reason>"). A failing step saves a screenshot in $SHOTS.
//
//   open <name> <token-env>      a new page (browser context) signed in with the token in that variable
//   domain <name> <domain>       select a domain
//   state <name> <uplink> <state> <ms>   wait until the uplink's row shows the state; answers the time it took
//   gap <name> <uplink> <ms>     wait until the uplink's timeline shows a dead segment
//   hbs <name> <uplink> <server> <ms>    wait until the uplink's row names that heartbeat server
//   range <name> <ms>            show the timelines over that span (a range button)
//   drain <name> <server>        press the server's Drain button
//   hidden <name> <selector>     the element exists and is hidden
//   domains <name> <d1,d2,...>   the domain list is exactly these
//   shot <name> <file>           save a screenshot
//   quit
import { chromium } from "playwright-core";
import readline from "node:readline";
import path from "node:path";

const shots = process.env.SHOTS || ".";
const base = process.env.UI_URL;
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-background-networking", "--disable-dev-shm-usage"],
});
const pages = new Map();
const page = (name) => {
  const p = pages.get(name);
  if (!p) throw new Error(`no page ${name}`);
  return p;
};
const row = (p, uplink) => p.locator(`#uplinks tr[data-uplink="${uplink}"]`);

async function run(words) {
  const [command, name, ...rest] = words;
  switch (command) {
    case "open": {
      const context = await browser.newContext();
      const p = await context.newPage();
      pages.set(name, p);
      await p.goto(base);
      await p.fill("#token", process.env[rest[0]] || "");
      await p.click("#login-form button");
      await p.waitForSelector("#app:not([hidden])", { timeout: 10000 });
      return "signed in";
    }
    case "domain": {
      await page(name).click(`button[data-domain="${rest[0]}"]`);
      await page(name).waitForSelector("#domain:not([hidden]) #uplinks tbody tr", { timeout: 10000 });
      return "shown";
    }
    case "state": {
      const [uplink, state, ms] = rest;
      const started = Date.now();
      await row(page(name), uplink).locator(`.state[data-state="${state}"]`).waitFor({ timeout: Number(ms) });
      return String(Date.now() - started);
    }
    case "gap": {
      const [uplink, ms] = rest;
      await page(name).locator(`svg[data-uplink="${uplink}"] rect[data-state="dead"]`).first().waitFor({ timeout: Number(ms) });
      return "dead segment shown";
    }
    case "hbs": {
      const [uplink, server, ms] = rest;
      const started = Date.now();
      await row(page(name), uplink).locator("td.hbs", { hasText: server }).waitFor({ timeout: Number(ms) });
      return String(Date.now() - started);
    }
    case "range": {
      await page(name).click(`#ranges button[data-range="${rest[0]}"]`);
      return "range " + rest[0];
    }
    case "drain": {
      await page(name).click(`#fleet button[data-action="drain"][data-server="${rest[0]}"]`);
      await page(name).locator(`#fleet tr[data-server="${rest[0]}"] [data-state="draining"]`).waitFor({ timeout: 10000 });
      return "draining";
    }
    case "hidden": {
      const hidden = await page(name).locator(rest[0]).isHidden();
      if (!hidden) throw new Error(`${rest[0]} is visible`);
      return "hidden";
    }
    case "domains": {
      // The list fills in after sign-in: wait (up to 10 s) for exactly these, then check once more.
      const want = rest[0].split(",").sort();
      const list = async () => (await page(name).locator("#domains button").allTextContents()).sort();
      const deadline = Date.now() + 10000;
      let got = await list();
      while (JSON.stringify(got) !== JSON.stringify(want) && Date.now() < deadline) {
        await new Promise((resolve) => setTimeout(resolve, 100));
        got = await list();
      }
      if (JSON.stringify(got) !== JSON.stringify(want)) throw new Error(`domains ${got} instead of ${want}`);
      return got.join(",");
    }
    case "shot": {
      await page(name).screenshot({ path: path.join(shots, rest[0]), fullPage: true });
      return "saved";
    }
    default:
      throw new Error(`unknown command ${command}`);
  }
}

const lines = readline.createInterface({ input: process.stdin });
for await (const line of lines) {
  const words = line.trim().split(/\s+/);
  if (words[0] === "quit") break;
  try {
    console.log("ok " + (await run(words)));
  } catch (error) {
    const step = words.slice(0, 3).join("-").replace(/[^a-z0-9-]/gi, "_");
    const files = [];
    for (const [pageName, p] of pages) {
      const file = path.join(shots, `failed-${step}-${pageName}.png`);
      await p.screenshot({ path: file, fullPage: true }).then(() => files.push(file), () => {});
    }
    console.log("fail " + String(error.message || error).replace(/\s+/g, " ") + " (screenshots: " + files.join(" ") + ")");
  }
}
await browser.close();
