// The operator's console in a real browser against `crm-host demo` (after demo.mjs connected
// the shared mailbox): the settings page as a setup guide that verifies the client secret,
// careful actions, the unread count, and every page at 390 px wide without sideways scrolling.
import { base, browser, check, finish, shots, signIn } from './lib/suite.mjs';



const page = await signIn('admin@contoso.example', 'operator-demo', { width: 1200, height: 900 });
// The demo's simulated app registration: the secret's Value (to restore it) and its Secret ID.
await page.goto(`${base}/demo/azure`);
const secretValue = (await page.textContent('#secret-value')).trim();
const secretId = (await page.textContent('#secret-id')).trim();

async function saveSecret(secret) {
  await page.goto(`${base}/settings`);
  await page.fill('#client_secret', secret);
  await Promise.all([page.waitForLoadState('load'), page.click('#settings-microsoft_outlook button[type=submit]')]);
  return page.textContent('main');
}

await check('the settings page is a setup guide: redirect URI with a copy button, permissions, portal link', async () => {
  await page.goto(`${base}/settings`);
  const text = await page.textContent('main');
  for (const words of ['/microsoft_outlook/confirm', 'SMTP.Send', 'offline_access', 'Mail.Send', 'SMTP.SendAsApp', 'Grant admin consent', 'Secret ID']) {
    if (!text.includes(words)) throw new Error(`the guide does not say "${words}"`);
  }
  if (!(await page.$('a[href*="entra.microsoft.com"]'))) throw new Error('no link to the portal');
  if (!(await page.$('a[href="/microsoft_outlook/servers"]'))) throw new Error('no next step to the servers');
  // The copy button's script is a file the policy allows: clicking it changes its label.
  await page.click('details.setup-guide summary').catch(() => {});
  const guideOpen = await page.evaluate(() => document.querySelector('details.setup-guide').open);
  if (!guideOpen) await page.click('details.setup-guide summary');
  await page.click('button[data-copy="redirect-uri"]');
  await page.waitForFunction(() => !/^Copy$/.test(document.querySelector('button[data-copy]').textContent.trim()));
  await page.screenshot({ path: `${shots}/settings.png`, fullPage: true });
});

await check('a wrong client secret does not replace the working one, and AADSTS7000215 is in words', async () => {
  const text = await saveSecret('a-wrong-secret-Q8~0123456789abcdefghijklmnop');
  if (!text.includes('Nothing was saved')) throw new Error('the working secret was replaced');
  if (!text.includes('the settings in use work')) throw new Error('no word of the settings kept');
  if (!text.includes('AADSTS7000215')) throw new Error('no AADSTS7000215');
  if (!text.includes('The client secret is invalid')) throw new Error('no words for 7000215');
  if (!(await page.$('#settings-check[role=alert]'))) throw new Error('the result is not announced');
  await page.screenshot({ path: `${shots}/settings-wrong-secret.png`, fullPage: true });
});

await check('a Secret ID (a GUID) pasted as the secret is refused and nothing is saved', async () => {
  const text = await saveSecret(secretId);
  if (!text.includes('Secret ID')) throw new Error('no explanation');
  if (!text.includes('Nothing was saved')) throw new Error('no "nothing was saved"');
  if (!(await page.$('p.error[role=alert]'))) throw new Error('no field error announced');
  await page.screenshot({ path: `${shots}/secret-id-refused.png`, fullPage: true });
});

await check('the working secret is verified (and restored for the suites after this one)', async () => {
  const text = await saveSecret(secretValue);
  if (!text.includes('verified')) throw new Error(`not verified: ${text.slice(0, 400)}`);
  await page.screenshot({ path: `${shots}/settings-verified.png`, fullPage: true });
});

await check('delete asks first and counts the queued mail; cancel keeps the server', async () => {
  await page.goto(`${base}/microsoft_outlook/servers`);
  await page.screenshot({ path: `${shots}/servers.png`, fullPage: true });
  await page.click('text=Office 365 (simulated)');
  await page.screenshot({ path: `${shots}/server.png`, fullPage: true });
  await page.click('a:has-text("Delete this server")');
  await page.waitForURL(/\/delete$/);
  const text = await page.textContent('main');
  if (!text.includes('What will happen')) throw new Error('no consequences');
  if (!/queued mail|No mail is waiting/.test(text)) throw new Error('does not say what happens to queued mail');
  await page.screenshot({ path: `${shots}/delete-confirm.png`, fullPage: true });
  await page.click('a:has-text("Cancel")');
  await page.waitForSelector('text=Outlook token validated');
});

await check('disable asks first', async () => {
  await page.goto(`${base}/modules`);
  await page.click('a:has-text("Disable")');
  await page.waitForURL(/\/modules\/microsoft_outlook\/disable$/);
  const text = await page.textContent('main');
  if (!text.includes('queued mail')) throw new Error('does not count the queued mail');
  await page.click('a:has-text("Cancel")');
  await page.waitForURL(/\/modules$/);
});

await check('a failed mail tells its author and the operators; the navigation counts it unread; mark all read clears it', async () => {
  // The simulated Exchange refuses the next recipient for good (550 5.1.10).
  await page.goto(`${base}/demo/faults`);
  await page.click('button:has-text("Play recipient-unknown")');
  const user = await signIn('alice@contoso.example', 'alice-demo', { width: 1200, height: 900 });
  await user.click('text=Dana Fabrikam');
  await user.fill('#mail-subject', 'Bounce check');
  await user.fill('#mail-body', 'This one is refused by the server.');
  await user.click('button:has-text("Send")');
  await user.waitForSelector('[data-compose-status]:not([hidden])');
  let found = false;
  for (let i = 0; i < 40 && !found; i += 1) {
    await user.goto(`${base}/notifications`);
    found = (await user.textContent('main')).includes('Mail not sent: "Bounce check"');
    if (!found) await user.waitForTimeout(500);
  }
  if (!found) throw new Error('the author was not told');
  if (!(await user.$('header a[href="/notifications"] .badge.unread'))) throw new Error('no unread count for the author');
  await user.screenshot({ path: `${shots}/notifications-author.png`, fullPage: true });
  await page.goto(`${base}/notifications`);
  if (!(await page.textContent('main')).includes('Mail not sent: "Bounce check"')) throw new Error('the operators were not told');
  const badge = await page.$('header a[href="/notifications"] .badge.unread');
  if (!badge) throw new Error('no unread count in the navigation');
  await page.screenshot({ path: `${shots}/notifications.png`, fullPage: true });
  await page.click('button:has-text("Mark all read")');
  await page.waitForURL(/read=all/);
  if (await page.$('header a[href="/notifications"] .badge.unread')) throw new Error('the count stayed');
  await user.context().close();
});

const phone = await signIn('admin@contoso.example', 'operator-demo', { width: 390, height: 844 });
const alice = await signIn('alice@contoso.example', 'alice-demo', { width: 390, height: 844 });

// The page `p` shows now is no wider than 390 px (a screenshot either way).
// Tables of name and value (a mail's envelope, its headers) wrap long values (Message-IDs,
// header values) instead of scrolling sideways inside the page.
async function fitsHere(p, name) {
  const width = await p.evaluate(() => document.documentElement.scrollWidth);
  const scrolled = await p.evaluate(() => [...document.querySelectorAll('table.fields, table.headers, table.cards')]
    .filter((t) => t.scrollWidth > t.clientWidth + 1)
    .map((t) => `${t.className} ${t.scrollWidth}px in ${t.clientWidth}px`));
  await p.screenshot({ path: `${shots}/390-${name}.png`, fullPage: true });
  if (width > 390) throw new Error(`${p.url()} is ${width}px wide at 390`);
  if (scrolled.length > 0) throw new Error(`${p.url()} scrolls sideways inside: ${scrolled.join('; ')}`);
}

async function fits(p, path, name) {
  const response = await p.goto(`${base}${path}`);
  if (!response || response.status() >= 400) throw new Error(`${path} answered ${response && response.status()}`);
  await fitsHere(p, name);
}

const serverLink = await (async () => {
  await phone.goto(`${base}/microsoft_outlook/servers`);
  return phone.getAttribute('a:has-text("Office 365 (simulated)")', 'href');
})();
const contactLink = await (async () => {
  await alice.goto(`${base}/contacts`);
  return alice.getAttribute('a:has-text("Dana Fabrikam")', 'href');
})();

for (const [path, name] of [
  ['/settings', 'settings'],
  ['/microsoft_outlook/servers', 'servers'],
  [serverLink, 'server'],
  ['/contacts', 'contacts'],
  [contactLink, 'contact'],
  ['/notifications', 'notifications'],
  ['/modules', 'modules'],
  ['/microsoft_outlook/outbox', 'outbox'],
  [`${serverLink}/delete`, 'delete-confirm'],
  [`${serverLink}/disconnect`, 'disconnect-confirm'],
  ['/modules/microsoft_outlook/disable', 'disable-confirm'],
]) {
  await check(`${name} fits 390 px without sideways scrolling`, () => fits(phone, path, name));
}
for (const [path, name] of [
  ['/microsoft_outlook/my-mailbox', 'my-mailbox'],
  [`${contactLink}`, 'contact-user'],
]) {
  await check(`${name} (a user) fits 390 px`, () => fits(alice, path, name));
}
// Lists shown as cards on a phone: every field of a row on the screen, named.
async function cardsShowAll(p, path, table, labels) {
  await p.goto(`${base}${path}`);
  const cells = await p.evaluate((t) => [...document.querySelectorAll(`${t} tbody tr:first-child td`)]
    .map((td) => ({ label: td.getAttribute('data-label'), right: td.getBoundingClientRect().right, shown: td.offsetParent !== null })), table);
  if (cells.length === 0) throw new Error(`${path}: no row in ${table}`);
  const off = cells.filter((c) => c.shown && c.right > 390);
  if (off.length > 0) throw new Error(`${path}: ${off.map((c) => c.label).join(', ')} off the 390 px screen`);
  const named = cells.map((c) => c.label);
  for (const label of labels) if (!named.includes(label)) throw new Error(`${path}: no ${label} in ${named}`);
}
await check('the servers list shows each server\'s health on a phone', () =>
  cardsShowAll(phone, '/microsoft_outlook/servers', 'table.servers', ['Health', 'Waiting', 'Last error']));
await check('a record\'s mails show their times on a phone', () =>
  cardsShowAll(alice, contactLink, 'table.mails', ['Status', 'Queued (UTC)', 'Updated (UTC)']));
await check('the mails list fits 390 px', async () => {
  await alice.goto(`${base}${contactLink}`);
  const mails = await alice.$('a[href*="/mails"]');
  const path = mails ? await mails.getAttribute('href') : null;
  if (!path) throw new Error('no link to the mails list');
  await fits(alice, path, 'mails');
});
await check('a sent mail\'s page in the outbox (Message-ID, headers) fits 390 px', async () => {
  await phone.goto(`${base}/microsoft_outlook/outbox?status=sent`);
  const link = await phone.$('table.outbox tbody a[href^="/microsoft_outlook/outbox/"]');
  const path = link ? await link.getAttribute('href') : null;
  if (!path) throw new Error('no sent mail in the outbox');
  await fits(phone, path, 'outbox-mail');
  if (!(await phone.textContent('main')).includes('Headers of the stored message')) throw new Error('not the mail\'s page');
});
await check('the result of Test connection fits 390 px', async () => {
  await phone.goto(`${base}${serverLink}`);
  await Promise.all([phone.waitForLoadState('load'), phone.click('button:has-text("Test connection")')]);
  await phone.waitForSelector('#test-result');
  await fitsHere(phone, 'test-connection');
});
await check('the bulk confirmation fits 390 px', async () => {
  await phone.goto(`${base}/microsoft_outlook/outbox`);
  await Promise.all([phone.waitForURL(/\/outbox\/bulk$/), phone.click('button:has-text("Retry these")')]);
  if (!/Retry \d+ mail\(s\)\?/.test(await phone.textContent('h1'))) throw new Error('not the confirmation');
  await fitsHere(phone, 'bulk-confirm');
});
await check('the login page (signed out) fits 390 px', async () => {
  const context = await browser.newContext({ viewport: { width: 390, height: 844 } });
  const fresh = await context.newPage();
  await fits(fresh, '/login', 'login');
  if (!(await fresh.$('#password'))) throw new Error('not the login form');
  await context.close();
});

await finish();
