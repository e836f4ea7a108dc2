//! Test connection of a server that sends through Microsoft Graph: the settings (where Graph
//! is), an access token for Graph (refreshed when due, and once more when Graph refuses it, as
//! a delivery does), then one harmless call on the mailbox — a read of one item of its Sent
//! Items, taking one of the mailbox's sending slots — that proves the token works there and
//! sends nothing. A Graph error answer gets the words of [`graph_replies::classify`].

use crm_sdk::{CurrentUser, ModuleContext};
use std::sync::Arc;
use std::time::Instant;

use super::{Report, SLOT_WAIT, Step, end_hold, no_slot, step, token_failed, token_step};
use crate::delivery::classify::HoldReason;
use crate::delivery::graph::GraphProbe;
use crate::delivery::graph_replies::{self, GraphReply};
use crate::entities::mail_server;
use crate::runtime::Shared;
use crate::settings::OutlookSettings;
use crate::tokens::service::fresh_access_token;

/// Holds that Graph reading the mailbox with its token proves fixed: the token is taken, and
/// the mailbox is in Exchange Online, and Microsoft is reached. (A missing Mail.Send is not
/// proved fixed by a read.)
const ENDED_BY_A_GRAPH_TEST: [HoldReason; 3] = [
    HoldReason::TokenRefused,
    HoldReason::NotExchangeOnline,
    HoldReason::Unreachable,
];

/// The name of the token step.
pub(super) const TOKEN_STEP: &str = "Access token for Microsoft Graph";

/// The name of the step that reads the mailbox.
fn read_step(mailbox: &str) -> String {
    format!("GET /v1.0/users/{mailbox}/mailFolders/SentItems/messages?$top=1")
}

/// Graph's answer as `viewer` sees it: operators the whole reply, others status and code.
fn shown_reply(reply: &GraphReply, viewer: &CurrentUser) -> String {
    if viewer.is_admin || reply.code.is_empty() {
        reply.text()
    } else {
        format!("{} {}", reply.status, reply.code)
    }
}

/// Tests a Graph server's connection as `viewer` sees it.
pub(super) async fn test(
    ctx: &ModuleContext,
    shared: &Arc<Shared>,
    server: &mail_server::Model,
    viewer: &CurrentUser,
) -> Report {
    let mut steps = Vec::new();
    let settings = match OutlookSettings::load(ctx).await {
        Ok(settings) => settings,
        Err(problem) => return failed(steps, step("Settings", false, problem.to_string()), None),
    };
    steps.push(step(
        "Settings",
        true,
        format!("Microsoft Graph at {}", settings.graph_url),
    ));
    let mut token = match fresh_access_token(ctx, shared, server, false).await {
        Ok(t) => t,
        Err(problem) => return token_failed(steps, TOKEN_STEP, &problem),
    };
    steps.push(token_step(TOKEN_STEP, &token));
    let slot = match shared
        .smtp
        .mailbox_slot(ctx, server.id, Instant::now() + SLOT_WAIT)
        .await
    {
        Ok(slot) => slot,
        Err(outcome) => return no_slot(steps, "A sending slot of the mailbox", outcome),
    };
    let read = read_step(&server.mailbox);
    let mut probe = shared
        .graph
        .probe(&settings.graph_url, &server.mailbox, &token)
        .await;
    if let GraphProbe::Refused(reply) = &probe
        && reply.refused_token()
        && !token.refreshed
    {
        // As a delivery does: a refused token that was not just issued is refreshed once.
        steps.push(step(
            read.clone(),
            false,
            format!(
                "{} — refreshing the token and trying again",
                shown_reply(reply, viewer)
            ),
        ));
        token = match fresh_access_token(ctx, shared, server, true).await {
            Ok(t) => t,
            Err(problem) => return token_failed(steps, TOKEN_STEP, &problem),
        };
        steps.push(token_step(TOKEN_STEP, &token));
        probe = shared
            .graph
            .probe(&settings.graph_url, &server.mailbox, &token)
            .await;
    }
    drop(slot);
    match probe {
        GraphProbe::Read { status } => {
            steps.push(step(
                read,
                true,
                format!(
                    "{status} OK: the token reads the mailbox {}",
                    server.mailbox
                ),
            ));
            let hold_ended = end_hold(ctx, shared, server, (&ENDED_BY_A_GRAPH_TEST, viewer)).await;
            Report {
                ok: true,
                steps,
                rule: None,
                words: None,
                hold_ended,
            }
        }
        GraphProbe::Refused(reply) => {
            let verdict = graph_replies::classify(&reply, &server.mailbox, &server.mailbox);
            let failed_step = step(read, false, shown_reply(&reply, viewer));
            failed(steps, failed_step, Some(verdict))
        }
        GraphProbe::Unreachable(detail) => {
            let verdict = graph_replies::unreachable(&detail);
            // The network is the operators' to check, not a mailbox owner's.
            let check = if viewer.is_admin {
                "Check that this CRM's machine can reach Microsoft Graph (DNS, firewall, proxy)"
            } else {
                "The CRM's operators can check its connection to Microsoft"
            };
            let words = format!(
                "{} {check}; mail meeting this would wait, spending no attempt, and be tried again later.",
                verdict.what
            );
            let mut report = failed(steps, step(read, false, detail), Some(verdict));
            report.words = Some(words);
            report
        }
    }
}

/// The report of a test that ended at `last`, with the verdict's rule and words when there
/// is one (else the step's own words).
fn failed(
    mut steps: Vec<Step>,
    last: Step,
    verdict: Option<crate::delivery::classify::Verdict>,
) -> Report {
    let (rule, words) = match verdict {
        Some(v) => (Some(v.rule.to_string()), Some(v.words())),
        None => (None, Some(last.detail.clone())),
    };
    steps.push(last);
    Report {
        ok: false,
        steps,
        rule,
        words,
        hold_ended: false,
    }
}
