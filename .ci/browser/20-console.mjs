// The operator's console, clicked through in a real browser against `crm-host demo` after
// demo.mjs connected the shared mailbox and sent a mail: the outbox with a filter, Retry of a
// failed mail, "Release held mail" of a held mailbox, and Test connection on a healthy and on
// a broken mailbox (the demo's simulated Exchange plays each fault once).
import { base, browser, check, finish, shots, signIn } from './lib/suite.mjs';



const admin = await signIn('admin@contoso.example', 'operator-demo');
const alice = await signIn('alice@contoso.example', 'alice-demo');

async function playFault(fault) {
  await admin.goto(`${base}/demo/faults`);
  await admin.click(`button:has-text("Play ${fault}")`);
  await admin.waitForURL(new RegExp(`played=${fault}`));
}

// Alice sends a mail from Dana's contact; returns nothing (the outbox finds it by subject).
async function aliceSends(subject) {
  await alice.goto(`${base}/contacts`);
  await alice.click('text=Dana Fabrikam');
  await alice.fill('#mail-subject', subject);
  await alice.fill('#mail-body', 'Sent by the console checks.');
  await alice.click('button:has-text("Send")');
  await alice.waitForSelector('[data-compose-status]:not([hidden])');
}

// The status of the newest outbox row with `subject`, reloading until it is `want`.
async function waitOutboxStatus(subject, want) {
  let shown = '';
  for (let i = 0; i < 40; i += 1) {
    await admin.goto(`${base}/microsoft_outlook/outbox?q=${encodeURIComponent(subject)}`);
    const row = admin.locator('table.outbox tbody tr').first();
    if (await row.count() > 0) {
      shown = await row.locator('td.status .badge').getAttribute('data-status');
      if (shown === want) return;
    }
    await admin.waitForTimeout(500);
  }
  throw new Error(`"${subject}" is "${shown}" in the outbox, not "${want}"`);
}

await check('the outbox filtered by status sent shows the demo\'s sent mail', async () => {
  await admin.goto(`${base}/microsoft_outlook/outbox`);
  if (!(await admin.textContent('header')).includes('Outbox')) throw new Error('no Outbox in the menu');
  await admin.selectOption('#f-status', 'sent');
  await admin.click('form.filters button[type=submit]');
  await admin.waitForURL(/status=sent/);
  const table = await admin.textContent('table.outbox');
  if (!table.includes('Quote from the browser check')) throw new Error('the demo\'s sent mail is not listed');
  const statuses = await admin.locator('table.outbox td.status .badge').evaluateAll((els) => els.map((e) => e.getAttribute('data-status')));
  if (statuses.some((s) => s !== 'sent')) throw new Error(`the filter shows ${statuses.join(', ')}`);
  await admin.screenshot({ path: `${shots}/outbox.png`, fullPage: true });
  await admin.click('table.outbox a:has-text("Quote from the browser check")');
  await admin.waitForSelector('text=Headers of the stored message');
  const envelope = await admin.textContent('#envelope');
  if (!envelope.includes('dana@fabrikam.example')) throw new Error('the envelope does not name the recipient');
  await admin.screenshot({ path: `${shots}/outbox-mail.png`, fullPage: true });
});

await check('Test connection on the healthy mailbox shows every step passing', async () => {
  await admin.goto(`${base}/microsoft_outlook/servers`);
  await admin.click('text=Office 365 (simulated)');
  await admin.click('button:has-text("Test connection")');
  await admin.waitForSelector('#test-result');
  const result = await admin.textContent('#test-result');
  if (!result.includes('Connection OK')) throw new Error(`the test says: ${result.trim()}`);
  if (!result.includes('AUTH XOAUTH2')) throw new Error('the AUTH step is not shown');
  await admin.screenshot({ path: `${shots}/test-connection-ok.png`, fullPage: true });
});

await check('Test connection on a mailbox Exchange refuses shows the 5.7.139 words', async () => {
  await playFault('smtp-auth-disabled');
  await admin.goto(`${base}/microsoft_outlook/servers`);
  await admin.click('text=Office 365 (simulated)');
  await admin.click('button:has-text("Test connection")');
  await admin.waitForSelector('#test-result');
  const result = await admin.textContent('#test-result');
  if (!result.includes('The connection test failed')) throw new Error(`the test says: ${result.trim()}`);
  if (!result.includes('5.7.139')) throw new Error('the reply is not shown');
  if (!result.includes('Authenticated SMTP')) throw new Error('the classification words are not shown');
  await admin.screenshot({ path: `${shots}/test-connection-broken.png`, fullPage: true });
});

await check('a failed mail is retried from the outbox and goes out', async () => {
  await playFault('recipient-unknown');
  await aliceSends('Retry from the outbox');
  await waitOutboxStatus('Retry from the outbox', 'failed');
  await admin.click('table.outbox a:has-text("Retry from the outbox")');
  const delivery = await admin.textContent('#delivery');
  if (!delivery.includes('5.1.10')) throw new Error('the detail page does not show the reply');
  await admin.screenshot({ path: `${shots}/outbox-failed.png`, fullPage: true });
  await admin.click('button:has-text("Retry now")');
  // The page tells what became of it: still on its way, or already sent.
  await admin.waitForSelector('p.flash:text-matches("Queued again|Sent: the server accepted it")');
  await waitOutboxStatus('Retry from the outbox', 'sent');
  // Its page keeps the failure before the retry, who retried it, and the accepted attempt.
  await admin.click('table.outbox a:has-text("Retry from the outbox")');
  const history = await admin.textContent('#history');
  for (const part of ['5.1.10', 'Queued again by', 'accepted by the server']) {
    if (!history.includes(part)) throw new Error(`the history lacks "${part}": ${history}`);
  }
  await admin.screenshot({ path: `${shots}/outbox-retried.png`, fullPage: true });
});

await check('a held mailbox is released from the outbox and its mail goes out', async () => {
  // Let the connection of the retried mail go idle and close (kept 3 s): a connection the
  // demo closes under a send less than a second old is not re-tested, and the send would
  // meet a dropped line (a retry in a minute) instead of the fault at AUTH.
  await admin.waitForTimeout(4000);
  await playFault('smtp-auth-disabled');
  await aliceSends('Released from the outbox');
  // The mailbox is held, and the attempt that met the refusal has put its mail back in the queue.
  let held = '';
  let row = '';
  let status = '';
  for (let i = 0; i < 40; i += 1) {
    await admin.goto(`${base}/microsoft_outlook/outbox`);
    held = await admin.locator('#held').count() > 0 ? await admin.textContent('#held') : '';
    row = await admin.textContent('table.outbox tbody tr:first-child');
    status = await admin.locator('table.outbox tbody tr:first-child td.status .badge').getAttribute('data-status');
    if (held && status === 'queued') break;
    await admin.waitForTimeout(500);
  }
  if (!held.includes('Held: SMTP AUTH disabled')) throw new Error(`the outbox shows no held mailbox (${held.trim()})`);
  if (!row.includes('Released from the outbox') || status !== 'queued') throw new Error(`the mail is not waiting: ${row}`);
  await admin.screenshot({ path: `${shots}/outbox-held.png`, fullPage: true });
  await admin.click('#held button:has-text("Release held mail")');
  await admin.waitForSelector('text=Released');
  await waitOutboxStatus('Released from the outbox', 'sent');
  await admin.goto(`${base}/microsoft_outlook/outbox`);
  if (await admin.locator('#held').count() > 0) throw new Error('the mailbox is still listed as holding mail');
  await admin.screenshot({ path: `${shots}/outbox-released.png`, fullPage: true });
});

await check('a user\'s outbox shows only their own mails, without release', async () => {
  await alice.goto(`${base}/microsoft_outlook/outbox`);
  const text = await alice.textContent('main');
  if (!text.includes('Released from the outbox')) throw new Error('Alice does not see her mail');
  if (text.includes('Release held mail')) throw new Error('a user is offered to release a mailbox');
  await alice.screenshot({ path: `${shots}/outbox-user.png`, fullPage: true });
});

await finish();
