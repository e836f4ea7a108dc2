// What every browser suite shares: where the demo runs, where screenshots go, one headless
// Debian Chromium, checks that count, and the closing line CI reads ("N passed, M failed").
import { chromium } from 'playwright-core';

export const base = process.env.DEMO_URL ?? 'http://127.0.0.1:18080';
export const shots = process.env.SHOTS ?? '/tmp';

let passed = 0;
let failed = 0;

/** Runs one named check; a thrown error fails it and the suite goes on. */
export async function check(name, fn) {
  try {
    await fn();
    passed += 1;
    console.log(`ok - ${name}`);
  } catch (e) {
    failed += 1;
    console.log(`not ok - ${name}: ${e.message}`);
  }
}

export const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});

/** Signs in as `email` in a page of its own (a fresh context: its own cookies, and
 * `viewport` if given); returns the page on the contacts list. */
export async function signIn(email, password, viewport) {
  const context = await browser.newContext(viewport ? { viewport } : {});
  const page = await context.newPage();
  page.setDefaultTimeout(20000);
  await page.goto(`${base}/login`);
  await page.fill('#email', email);
  await page.fill('#password', password);
  await page.click('button[type=submit]');
  await page.waitForURL(/\/contacts/);
  return page;
}

/** Closes the browser, prints the closing line and exits non-zero if a check failed. */
export async function finish() {
  await browser.close();
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed === 0 ? 0 : 1);
}
