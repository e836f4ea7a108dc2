//! Admitting mails to the outbox: whether the author may file each under its record, the
//! server it goes through, its From and envelope sender, its message text and its outbox row.
//! Concurrent requests are admitted together (`outbox::group_insert`): one record look-up and
//! one server query for the whole group, whatever its size.
//!
//! Why: on SQLite every statement is a round trip to the driver's thread, and the record
//! look-up and the server query of each request cost the queue route about as much CPU as the
//! whole trivial handler of the host (BENCHMARKS.md, Enqueue).

use std::collections::{BTreeSet, HashMap};

use actix_web::http::StatusCode;
use chrono::Utc;
use crm_sdk::{CurrentUser, ModuleContext, RecordAccess, RecordRef};
use lettre::message::Mailbox;
use sea_orm::sea_query::Query;
use sea_orm::{ColumnTrait, Condition, EntityTrait, QueryFilter, QueryOrder, Set};

use crate::entities::{mail_server, outbox, token};
use crate::outbox::compose::OutgoingMail;
use crate::outbox::refusal::{Refusal, refuse};
use crate::settings::PersonalSmtpHosts;

/// Exchange Online's fixed maximum message size, encoded (its `SIZE` extension's value).
pub const EXCHANGE_MAX_MESSAGE_BYTES: usize = 35_882_577;

/// A mail to admit: who wrote it, the record it is filed under (not checked yet), the mail
/// (parsed and within the size limits) and its Message-ID (without angle brackets).
pub struct Request {
    /// The author, signed in.
    pub author: CurrentUser,
    /// The record the mail is filed under.
    pub record: RecordRef,
    /// The mail.
    pub mail: OutgoingMail,
    /// Its Message-ID, fixed before it joins its group.
    pub message_id: String,
}

/// An admitted mail: the server it goes through, its outbox row (not stored yet) and its
/// message text (RFC 5322, CRLF line ends).
pub struct Admitted {
    /// Its Message-ID (the row's).
    pub message_id: String,
    /// The server.
    pub server: mail_server::Model,
    /// The row to insert.
    pub row: outbox::ActiveModel,
    /// The message text.
    pub raw: String,
}

/// Whether `address` may be used as From on `server`.
pub fn allowed_from(server: &mail_server::Model, address: &str) -> bool {
    let address = address.to_ascii_lowercase();
    let entries: Vec<&str> = server
        .from_allow_list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if entries.is_empty() {
        return server.send_as == "author" || address.eq_ignore_ascii_case(&server.mailbox);
    }
    address.eq_ignore_ascii_case(&server.mailbox)
        || entries.iter().any(|e| match e.strip_prefix('@') {
            Some(domain) => address
                .rsplit_once('@')
                .is_some_and(|(_, d)| d.eq_ignore_ascii_case(domain)),
            None => e.eq_ignore_ascii_case(&address),
        })
}

/// The server the mails of each of `authors` go through, by user id: their connected personal
/// mailbox, else the default shared server (then the oldest shared one); an author without
/// either is absent. One query: the authors' personal servers that have a token, and the
/// shared servers.
pub async fn choose_servers(
    ctx: &ModuleContext,
    authors: &BTreeSet<i64>,
) -> Result<HashMap<i64, mail_server::Model>, sea_orm::DbErr> {
    let connected = Query::select()
        .column(token::Column::ServerId)
        .from(token::Entity)
        .to_owned();
    let servers = mail_server::Entity::find()
        .filter(
            Condition::any()
                .add(
                    Condition::all()
                        .add(mail_server::Column::Kind.eq("personal"))
                        .add(mail_server::Column::OwnerUserId.is_in(authors.iter().copied()))
                        .add(mail_server::Column::Id.in_subquery(connected)),
                )
                .add(mail_server::Column::Kind.eq("shared")),
        )
        .order_by_desc(mail_server::Column::IsDefault)
        .order_by_asc(mail_server::Column::Id)
        .all(ctx.db())
        .await?;
    let shared = servers.iter().find(|s| s.kind == "shared");
    Ok(authors
        .iter()
        .filter_map(|author| {
            servers
                .iter()
                .find(|s| s.kind == "personal" && s.owner_user_id == Some(*author))
                .or(shared)
                .map(|s| (*author, s.clone()))
        })
        .collect())
}

/// Why the module must not connect to a personal mailbox's server for `user` (users never
/// choose where the server connects): its host and port are not among those the operator
/// allows, or it is unencrypted and `user` is not an operator. A server saved before the
/// operator narrowed the list is caught here too. `None` for shared servers and allowed ones.
pub async fn outbound_refusal(
    ctx: &ModuleContext,
    server: &mail_server::Model,
    user: &CurrentUser,
) -> Option<String> {
    if server.kind != "personal" {
        return None;
    }
    outbound_refusal_with(&PersonalSmtpHosts::load(ctx).await, server, user)
}

/// [`outbound_refusal`] with the operator's allowed hosts already read.
fn outbound_refusal_with(
    hosts: &PersonalSmtpHosts,
    server: &mail_server::Model,
    user: &CurrentUser,
) -> Option<String> {
    let port = u16::try_from(server.smtp_port).unwrap_or(0);
    if server.kind != "personal"
        || (hosts.allows(&server.smtp_host, port) && (server.security != "none" || user.is_admin))
    {
        return None;
    }
    Some(format!(
        "This mailbox connects to {}:{}, which the operator does not allow for personal mailboxes (allowed: {}). Change it under My mailbox.",
        server.smtp_host,
        server.smtp_port,
        hosts.describe()
    ))
}

/// Mails holding more bytes than this in all are built off the request threads
/// (`spawn_blocking`): encoding files in base64 would stall the other connections of the
/// thread the group's writer runs on.
pub const BUILD_APART_BYTES: usize = 1024 * 1024;

/// Admits each of `requests` (one answer per request, in order): the record must be visible
/// to its author, the author must have a server that may be used, and the mail must build
/// within Exchange Online's size. When the server query fails they are all refused (503).
pub async fn admit_all(
    ctx: &ModuleContext,
    requests: Vec<Request>,
) -> Vec<Result<Admitted, Refusal>> {
    let access = look_up_records(ctx, &requests).await;
    let authors: BTreeSet<i64> = requests.iter().map(|r| r.author.id).collect();
    let servers = match choose_servers(ctx, &authors).await {
        Ok(servers) => servers,
        Err(e) => {
            let why = format!("the database did not answer ({e})");
            return requests
                .iter()
                .map(|_| {
                    Err(refuse(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "server",
                        why.clone(),
                    ))
                })
                .collect();
        }
    };
    let hosts = if servers.values().any(|s| s.kind == "personal") {
        Some(PersonalSmtpHosts::load(ctx).await)
    } else {
        None
    };
    let decided: Vec<Result<(mail_server::Model, Request), Refusal>> = requests
        .into_iter()
        .zip(access)
        .map(|(request, access)| {
            access?;
            let Some(server) = servers.get(&request.author.id) else {
                return Err(refuse(
                    StatusCode::CONFLICT,
                    "server",
                    "No outgoing mail server is configured: an operator must add and connect one (Outgoing mail servers), or connect your own mailbox (My mailbox).",
                ));
            };
            if let Some(why) = hosts
                .as_ref()
                .and_then(|h| outbound_refusal_with(h, server, &request.author))
            {
                return Err(refuse(StatusCode::CONFLICT, "server", why));
            }
            Ok((server.clone(), request))
        })
        .collect();
    let now = ctx.clock().now();
    let bytes: usize = decided
        .iter()
        .flatten()
        .map(|(_, r)| r.mail.size_bytes())
        .sum();
    let count = decided.len();
    let build_all = move || {
        decided
            .into_iter()
            .map(|d| d.and_then(|(server, request)| build(&server, request, now, false)))
            .collect()
    };
    if bytes <= BUILD_APART_BYTES {
        return build_all();
    }
    tokio::task::spawn_blocking(build_all)
        .await
        .unwrap_or_else(|e| {
            let why = format!("the mail could not be built ({e})");
            (0..count)
                .map(|_| Err(refuse(StatusCode::SERVICE_UNAVAILABLE, "to", why.clone())))
                .collect()
        })
}

/// Whether each request's record may be used by its author (`Ok`), or its refusal: one
/// look-up for all; should that fail, one per request, so that a record the host cannot read
/// refuses only its own mail.
async fn look_up_records(ctx: &ModuleContext, requests: &[Request]) -> Vec<Result<(), Refusal>> {
    let lookups: Vec<(&RecordRef, &CurrentUser)> =
        requests.iter().map(|r| (&r.record, &r.author)).collect();
    let answers = match ctx.records().find_many(&lookups).await {
        Ok(access) if access.len() == requests.len() => access.into_iter().map(Ok).collect(),
        _ => {
            let mut answers = Vec::with_capacity(requests.len());
            for (record, viewer) in &lookups {
                answers.push(ctx.records().find(record, viewer).await);
            }
            answers
        }
    };
    requests
        .iter()
        .zip(answers)
        .map(|(request, answer)| match answer {
            Ok(RecordAccess::Visible(_)) => Ok(()),
            // Hidden or missing: the same answer.
            Ok(RecordAccess::Missing | RecordAccess::Hidden) => Err(refuse(
                StatusCode::NOT_FOUND,
                "record",
                format!("there is no {} {}", request.record.model, request.record.id),
            )),
            Err(e) => Err(refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "record",
                format!("the record could not be looked up ({e})"),
            )),
        })
        .collect()
}

/// The From header and the envelope sender of a mail of `author` through `server`: the author,
/// or the mailbox as the server says (always the mailbox when `as_mailbox`), refused when the
/// server may not send as it.
fn sender(
    server: &mail_server::Model,
    author: &CurrentUser,
    as_mailbox: bool,
) -> Result<(Mailbox, String), Refusal> {
    let mailbox_address = server.mailbox.parse().map_err(|_| {
        refuse(
            StatusCode::CONFLICT,
            "server",
            "the mail server's mailbox address is invalid",
        )
    })?;
    let (from, envelope_from) =
        if as_mailbox || server.kind == "personal" || server.send_as == "mailbox" {
            (
                Mailbox::new(Some(author.name.clone()), mailbox_address),
                server.mailbox.clone(),
            )
        } else {
            let author_address = author.email.parse().map_err(|_| {
                refuse(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "from",
                    "your user's e-mail address is not valid",
                )
            })?;
            (
                Mailbox::new(Some(author.name.clone()), author_address),
                author.email.clone(),
            )
        };
    if !allowed_from(server, from.email.as_ref()) {
        return Err(refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "from",
            format!(
                "the server \"{}\" may not send as {}: it is not in its \"may send as\" list. Ask an operator to add it (and to grant Send As in Exchange).",
                server.name, from.email
            ),
        ));
    }
    Ok((from, envelope_from))
}

/// The outbox row and message text of `request` through `server` (already chosen and
/// allowed), dated `now`: From is the author or the mailbox as the server says, or the
/// mailbox itself when `as_mailbox` (a test mail of the server page). Refused when the server
/// may not send as the author, the mail cannot be built, or it is over Exchange Online's size.
pub fn build(
    server: &mail_server::Model,
    request: Request,
    now: chrono::DateTime<Utc>,
    as_mailbox: bool,
) -> Result<Admitted, Refusal> {
    let Request {
        author,
        record,
        mut mail,
        message_id,
    } = request;
    let (from, envelope_from) = sender(server, &author, as_mailbox)?;
    if server.send_as == "mailbox" && server.kind == "shared" && mail.reply_to.is_none() {
        mail.reply_to = author
            .email
            .parse()
            .ok()
            .map(|a| Mailbox::new(Some(author.name.clone()), a));
    }
    let recipients: Vec<String> = mail.recipients().map(|a| a.to_string()).collect();
    let subject = mail.subject.clone();
    let message = mail
        .build(from.clone(), None, &message_id, now.into())
        .map_err(|e| {
            refuse(
                StatusCode::UNPROCESSABLE_ENTITY,
                "to",
                format!("the mail cannot be built: {e}"),
            )
        })?;
    let raw = String::from_utf8(message.formatted())
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
    drop(message);
    if raw.len() > EXCHANGE_MAX_MESSAGE_BYTES {
        return Err(refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "attachments",
            format!(
                "Encoded for sending, the mail is {}; Exchange Online accepts at most {} per message. Attach fewer or smaller files.",
                crate::outbox::attachments::size_words(raw.len()),
                crate::outbox::attachments::size_words(EXCHANGE_MAX_MESSAGE_BYTES)
            ),
        ));
    }
    let row = outbox::ActiveModel {
        message_id: Set(message_id.clone()),
        status: Set("queued".into()),
        server_id: Set(server.id),
        author_user_id: Set(author.id),
        record_model: Set(record.model),
        record_id: Set(record.id),
        from_header: Set(from.to_string()),
        envelope_from: Set(envelope_from),
        recipients: Set(recipients.join("\n")),
        subject: Set(subject),
        size_bytes: Set(raw.len() as i64),
        attempts: Set(0),
        next_attempt_at: Set(now),
        created_at: Set(now),
        updated_at: Set(Utc::now()),
        ..Default::default()
    };
    Ok(Admitted {
        message_id,
        server: server.clone(),
        row,
        raw,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use crm_sdk::{
        BoxError, Chrome, NullNotifier, RecordDirectory, RecordSummary, Sealer, SealingKey,
        SettingsError, SettingsStore, SettingsValues, SystemClock,
    };

    use super::*;

    /// The contact that cannot be read alone (the others are visible)...
    const UNREADABLE: i64 = 2;
    /// ...and the one that does not exist.
    const MISSING: i64 = 3;

    /// How the directory answers the look-up of a whole group.
    #[derive(Clone, Copy, Debug)]
    enum Group {
        Answers,
        Fails,
        AnswersOneShort,
    }

    /// The host's records as a test double that counts how it is asked.
    struct Directory {
        group: Group,
        many_calls: AtomicUsize,
        find_calls: AtomicUsize,
    }

    impl Directory {
        fn answer(record: &RecordRef) -> RecordAccess {
            if record.id == MISSING {
                return RecordAccess::Missing;
            }
            RecordAccess::Visible(RecordSummary {
                title: format!("Contact {}", record.id),
                email: None,
                url: format!("/contacts/{}", record.id),
            })
        }
    }

    #[async_trait]
    impl RecordDirectory for Directory {
        async fn find(
            &self,
            record: &RecordRef,
            _viewer: &CurrentUser,
        ) -> Result<RecordAccess, BoxError> {
            self.find_calls.fetch_add(1, Ordering::SeqCst);
            if record.id == UNREADABLE {
                return Err("the contacts table is locked".into());
            }
            Ok(Self::answer(record))
        }

        async fn find_many(
            &self,
            lookups: &[(&RecordRef, &CurrentUser)],
        ) -> Result<Vec<RecordAccess>, BoxError> {
            self.many_calls.fetch_add(1, Ordering::SeqCst);
            let answers = lookups.iter().map(|(record, _)| Self::answer(record));
            match self.group {
                Group::Answers => Ok(answers.collect()),
                Group::Fails => Err("the group's query timed out".into()),
                Group::AnswersOneShort => Ok(answers.skip(1).collect()),
            }
        }
    }

    struct NoSettings;

    #[async_trait]
    impl SettingsStore for NoSettings {
        async fn load(&self, _module: &str) -> Result<SettingsValues, SettingsError> {
            Ok(SettingsValues::default())
        }
    }

    struct BareChrome;

    impl Chrome for BareChrome {
        fn page(&self, _title: &str, _user: Option<&CurrentUser>, body: &str) -> String {
            body.to_string()
        }
    }

    /// A context whose records are `directory`; the look-up touches nothing else.
    fn context(directory: Arc<Directory>) -> ModuleContext {
        ModuleContext::new(
            "microsoft_outlook",
            sea_orm::DatabaseConnection::default(),
            "https://crm.contoso.example".parse().expect("URL"),
            Arc::new(NoSettings),
            directory,
            Arc::new(NullNotifier),
            Arc::new(SystemClock),
            Sealer::new(&SealingKey::generate()),
            Arc::new(BareChrome),
        )
    }

    /// A mail of user `author` filed under contact `record`.
    fn request(author: i64, record: i64) -> Request {
        Request {
            author: CurrentUser {
                id: author,
                email: format!("user{author}@contoso.example"),
                name: format!("User {author}"),
                is_admin: false,
                csrf_token: String::new(),
            },
            record: RecordRef {
                model: "contact".into(),
                id: record,
            },
            mail: OutgoingMail {
                to: vec!["dana@fabrikam.example".parse().expect("address")],
                cc: Vec::new(),
                bcc: Vec::new(),
                subject: format!("About contact {record}"),
                text_body: "Hello".into(),
                html_body: None,
                reply_to: None,
                attachments: Vec::new(),
            },
            message_id: format!("m{author}-{record}@crm.contoso.example"),
        }
    }

    /// Each answer in words: `ok`, or the status and the message of the refusal.
    fn words(answers: &[Result<(), Refusal>]) -> Vec<String> {
        answers
            .iter()
            .map(|a| match a {
                Ok(()) => "ok".to_string(),
                Err(r) => format!("{} {}", r.status.as_u16(), r.errors[0].message),
            })
            .collect()
    }

    #[tokio::test]
    async fn a_record_that_cannot_be_read_refuses_only_its_own_mail_when_the_group_look_up_fails() {
        let requests = [
            request(10, 1),
            request(11, UNREADABLE),
            request(12, MISSING),
            request(13, 4),
        ];
        let refused = "503 the record could not be looked up (the contacts table is locked)";
        let missing = "404 there is no contact 3";
        // How the group is answered; then the answers, in order, and how many records were
        // looked up alone.
        let cases = [
            (Group::Answers, ["ok", "ok", missing, "ok"], 0),
            (Group::Fails, ["ok", refused, missing, "ok"], 4),
            (Group::AnswersOneShort, ["ok", refused, missing, "ok"], 4),
        ];
        for (group, expected, alone) in cases {
            let directory = Arc::new(Directory {
                group,
                many_calls: AtomicUsize::new(0),
                find_calls: AtomicUsize::new(0),
            });
            let answers = look_up_records(&context(directory.clone()), &requests).await;
            assert_eq!(words(&answers), expected, "{group:?}");
            assert_eq!(directory.many_calls.load(Ordering::SeqCst), 1, "{group:?}");
            assert_eq!(
                directory.find_calls.load(Ordering::SeqCst),
                alone,
                "{group:?}: records looked up alone"
            );
        }
    }
}
