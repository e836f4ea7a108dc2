// Sending through Microsoft Graph in a real browser against `crm-host demo` (after the earlier
// suites): the operator connects "Office 365 via Graph (simulated)" at the simulated consent
// page, tests its connection (Graph's steps, passing, then a 403 in words), makes it the
// default; Alice's mail from a contact goes out through the simulated Graph and shows on
// /demo/received. At the end the SMTP server is the default again, as the other suites expect.
import { base, browser, check, finish, shots, signIn } from './lib/suite.mjs';

const GRAPH_SERVER = 'Office 365 via Graph (simulated)';
const SMTP_SERVER = 'Office 365 (simulated)';


const admin = await signIn('admin@contoso.example', 'operator-demo');

// Opens a server's page from the list, by its exact name.
async function openServer(name) {
  await admin.goto(`${base}/microsoft_outlook/servers`);
  await admin.click(`table a:text-is("${name}")`);
  await admin.waitForSelector(`h1:text-is("${name}")`);
}

// Makes `name` the default outgoing server through its form.
async function makeDefault(name) {
  await openServer(name);
  await admin.check('input[name="is_default"]');
  await Promise.all([admin.waitForURL(/saved=1/), admin.click('button:has-text("Save")')]);
  await admin.goto(`${base}/microsoft_outlook/servers`);
  const first = await admin.textContent('table tbody tr:first-child td:first-child');
  if (!first.includes(name) || !first.includes('default')) throw new Error(`the default server is "${first.trim()}"`);
}

async function testConnection() {
  await openServer(GRAPH_SERVER);
  await Promise.all([admin.waitForURL(/\/test$/), admin.click('button:has-text("Test connection")')]);
  await admin.waitForSelector('#test-result');
  return admin.textContent('#test-result');
}

await check('the Graph server is offered, not connected, and asks for Graph\'s permissions at Connect', async () => {
  await admin.goto(`${base}/microsoft_outlook/servers`);
  const row = await admin.textContent(`table tbody tr:has-text("${GRAPH_SERVER}")`);
  if (!row.includes('Not connected')) throw new Error(`the Graph server's row says: ${row.trim()}`);
  await openServer(GRAPH_SERVER);
  if ((await admin.inputValue('#transport')) !== 'graph') throw new Error('the server does not send through Graph');
  await admin.click('form[action="/microsoft_outlook/connect"] button');
  await admin.waitForSelector('text=Permissions requested');
  const scopes = await admin.textContent('ul');
  if (!scopes.includes('Mail.Send') || scopes.includes('SMTP.Send')) throw new Error(`the consent asks for: ${scopes.trim()}`);
  await admin.screenshot({ path: `${shots}/graph-consent.png` });
  await admin.click('button:has-text("Accept")');
  await admin.waitForSelector('text=Outlook token validated');
  await admin.screenshot({ path: `${shots}/graph-validated.png`, fullPage: true });
});

await check('Test connection on the Graph server shows Graph\'s steps passing', async () => {
  const result = await testConnection();
  if (!result.includes('Connection OK')) throw new Error(`the test says: ${result.trim()}`);
  if (!result.includes('Access token for Microsoft Graph')) throw new Error('no Graph token step');
  if (!result.includes('mailFolders/SentItems/messages?$top=1')) throw new Error('no Graph read step');
  if (result.includes('EHLO') || result.includes('XOAUTH2')) throw new Error('SMTP steps are shown for a Graph server');
  await admin.screenshot({ path: `${shots}/graph-test-ok.png`, fullPage: true });
});

await check('Test connection when Graph denies the mailbox shows 403 ErrorAccessDenied in words', async () => {
  await admin.goto(`${base}/demo/faults`);
  await admin.click('button:has-text("Play graph-access-denied")');
  await admin.waitForURL(/played=graph-access-denied/);
  const result = await testConnection();
  if (!result.includes('The connection test failed')) throw new Error(`the test says: ${result.trim()}`);
  if (!result.includes('403 ErrorAccessDenied')) throw new Error('the status and code are not shown');
  if (!result.includes('graph-access-denied') || !result.includes('Mail.Send')) throw new Error('the classification words are not shown');
  await admin.screenshot({ path: `${shots}/graph-test-denied.png`, fullPage: true });
});

await check('the operator makes the Graph server the default', () => makeDefault(GRAPH_SERVER));

const subject = 'Through Graph from the browser check';
await check('Alice sends from Dana\'s contact and the mail goes out through the simulated Graph', async () => {
  await admin.goto(`${base}/demo/received`);
  const overSmtp = await admin.locator('#received-smtp tbody tr').count();
  const alice = await signIn('alice@contoso.example', 'alice-demo');
  await alice.click('text=Dana Fabrikam');
  await alice.fill('#mail-to', 'dana@fabrikam.example');
  await alice.fill('#mail-subject', subject);
  await alice.fill('#mail-body', 'Hello Dana, this one goes through Microsoft Graph.');
  await alice.click('form[data-compose] button[type=submit]');
  await alice.locator('form[data-compose] [data-compose-status]').waitFor({ state: 'visible' });
  // The open page follows the mail's status by itself.
  await alice.waitForFunction((s) => {
    const r = [...document.querySelectorAll('table.mails tbody tr')].find((tr) => tr.textContent.includes(s));
    return r && r.getAttribute('data-status') === 'sent';
  }, subject, { timeout: 30000 });
  await alice.screenshot({ path: `${shots}/graph-mails.png`, fullPage: true });
  await alice.close();
  await admin.goto(`${base}/demo/received`);
  const row = await admin.textContent(`#received-graph tbody tr:has-text("${subject}")`);
  if (!row.includes(subject)) throw new Error('the simulated Graph did not get the mail');
  if (!row.includes('via Graph')) throw new Error('the mail is not shown as received via Graph');
  if (!row.includes('crm@contoso.example')) throw new Error('the mailbox is not shown');
  if ((await admin.locator('#received-smtp tbody tr').count()) !== overSmtp) throw new Error('a mail went over SMTP too');
  await admin.screenshot({ path: `${shots}/graph-received.png`, fullPage: true });
});

await check('the SMTP server is the default again', () => makeDefault(SMTP_SERVER));

await finish();
