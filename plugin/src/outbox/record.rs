//! Outcomes, a batch at a time: one statement writes the outcomes of every sent mail, and one
//! more per other kind of outcome; only the claim's owner's rows are written.

use chrono::{DateTime, Utc};
use crm_sdk::ModuleContext;
use sea_orm::sea_query::{CaseStatement, Expr, ExprTrait, Query};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, EntityTrait, QueryFilter, TransactionTrait,
};

use crate::entities::{outbox, outbox_body};
use crate::outbox::claims::{BATCH, persist};
use crate::runtime::WriteTurn;

/// How long a drain goes on trying to write outcomes the database refuses (every quarter
/// second). Outcomes the database could not be reached for
/// ([`crate::reach::is_unreachable`]) are tried for as long as the process lives: a mail
/// the server took must not be sent again because the database was away longer than this.
pub const OUTCOME_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

/// The outcome of one claimed mail, to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The outbox row.
    pub id: i64,
    /// `sent`, `queued` (again) or `failed`.
    pub status: &'static str,
    /// When it is due again (queued only).
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The server's reply, if any (kept from before when `None`).
    pub last_reply: Option<String>,
    /// What went wrong, in words.
    pub last_error: Option<String>,
    /// Give the attempt back: nothing was tried (the mailbox waits).
    pub uncount: bool,
    /// Whether this mail's attempt met what it tells (false for the rest of a batch that
    /// waits because an earlier mail met its mailbox's problem): only a tried one goes in the
    /// mail's history.
    pub tried: bool,
}

/// What outcomes written by one statement share: status, due time, reply (not for sent
/// mail, whose replies go in one statement), words, and whether the attempt is given back and
/// goes in the history.
type Shape<'a> = (
    &'static str,
    Option<DateTime<Utc>>,
    Option<&'a str>,
    Option<&'a str>,
    (bool, bool),
);

impl Outcome {
    /// Outcomes that can be written by one statement share this.
    fn shape(&self) -> Shape<'_> {
        let reply = if self.status == "sent" {
            None
        } else {
            self.last_reply.as_deref()
        };
        (
            self.status,
            self.next_attempt_at,
            reply,
            self.last_error.as_deref(),
            (self.uncount, self.tried),
        )
    }
}

/// Writes the outcomes of a claimed batch in `turn` (only where `owner` still holds the
/// claim): every sent mail in one statement of fixed text ([`write_sent`]), the others one
/// statement per shape (a hold makes the whole rest of a batch wait alike; an outcome that did
/// not go out is written with its history rows, in one transaction). Bodies of sent mails are
/// deleted at once when `keep_sent_days` is 0.
pub async fn record(
    ctx: &ModuleContext,
    turn: &WriteTurn,
    owner: &str,
    outcomes: &[Outcome],
    delete_sent_bodies: bool,
) -> Result<(), sea_orm::DbErr> {
    let now = ctx.clock().now();
    let mut groups: Vec<(_, Vec<&Outcome>)> = Vec::new();
    for o in outcomes {
        match groups.iter_mut().find(|(shape, _)| *shape == o.shape()) {
            Some((_, members)) => members.push(o),
            None => groups.push((o.shape(), vec![o])),
        }
    }
    for (_, members) in groups {
        for chunk in members.chunks(BATCH as usize) {
            persist(|| write_group(turn.db(), owner, now, chunk)).await?;
        }
    }
    if delete_sent_bodies {
        let sent: Vec<i64> = outcomes
            .iter()
            .filter(|o| o.status == "sent")
            .map(|o| o.id)
            .collect();
        if !sent.is_empty() {
            // Only of rows that are sent now (a row another worker took over keeps its text).
            let really_sent = Query::select()
                .column(outbox::Column::Id)
                .from(outbox::Entity)
                .and_where(outbox::Column::Id.is_in(sent.iter().copied()))
                .and_where(outbox::Column::Status.eq("sent"))
                .to_owned();
            persist(|| {
                outbox_body::Entity::delete_many()
                    .filter(outbox_body::Column::OutboxId.in_subquery(really_sent.clone()))
                    .exec(turn.db())
            })
            .await?;
        }
    }
    Ok(())
}

/// One statement for outcomes of one shape.
async fn write_group(
    db: &sea_orm::DatabaseConnection,
    owner: &str,
    now: DateTime<Utc>,
    members: &[&Outcome],
) -> Result<(), sea_orm::DbErr> {
    let Some(first) = members.first() else {
        return Ok(());
    };
    let sent = first.status == "sent";
    if sent && first.next_attempt_at.is_none() && first.last_error.is_none() && !first.uncount {
        return write_sent(db, owner, now, members).await;
    }
    let mut update = crate::outbox::claims::unclaimed(first.status)
        .col_expr(outbox::Column::UpdatedAt, Expr::value(now))
        .col_expr(
            outbox::Column::LastError,
            Expr::value(first.last_error.clone()),
        )
        // Sent now; otherwise not sent (an admission under the per-minute limit is taken back).
        .col_expr(outbox::Column::SentAt, Expr::value(sent.then_some(now)));
    if let Some(at) = first.next_attempt_at {
        update = update.col_expr(outbox::Column::NextAttemptAt, Expr::value(at));
    }
    if sent {
        let mut replies = CaseStatement::new();
        for o in members {
            replies = replies.case(
                Expr::col(outbox::Column::Id).eq(o.id),
                Expr::value(o.last_reply.clone()),
            );
        }
        let replies = replies.finally(Expr::col(outbox::Column::LastReply));
        update = update.col_expr(outbox::Column::LastReply, replies.into());
    } else if first.last_reply.is_some() {
        update = update.col_expr(
            outbox::Column::LastReply,
            Expr::value(first.last_reply.clone()),
        );
    }
    if first.uncount {
        update = update.col_expr(
            outbox::Column::Attempts,
            Expr::col(outbox::Column::Attempts).sub(1),
        );
    }
    let update = update
        .filter(outbox::Column::Id.is_in(members.iter().map(|o| o.id)))
        .filter(if sent {
            // A mail the server took is sent, also when the sweep put it back in the queue
            // meanwhile (the outcome came late) and no other drain has claimed it yet.
            Condition::any()
                .add(outbox::Column::LeaseOwner.eq(owner))
                .add(outbox::status_is("queued"))
        } else {
            Condition::all().add(outbox::Column::LeaseOwner.eq(owner))
        });
    // A mail that waits for its mailbox without having met the problem itself (the rest of a
    // batch) has nothing to tell.
    let untold = first.uncount
        && (!first.tried || (first.last_reply.is_none() && first.last_error.is_none()));
    if sent || untold {
        return update.exec(db).await.map(|_| ());
    }
    // An attempt that did not go out goes in the mail's history, for the rows this update
    // wrote (those the claim's owner still held), in the same transaction.
    let kind = if first.uncount {
        crate::outbox::history::WAITED
    } else if first.status == "failed" {
        crate::outbox::history::FAILED
    } else {
        crate::outbox::history::DEFERRED
    };
    let txn = db.begin().await?;
    let written = update.exec_with_returning(&txn).await?;
    let said = (first.last_reply.as_deref(), first.last_error.as_deref());
    crate::outbox::history::attempts(&txn, now, kind, &written, said).await?;
    txn.commit().await
}

/// The statement of [`write_sent`] on each database: the same text whatever the number of
/// mails (prepared once per connection); `(id, reply)` pairs come in one JSON parameter.
const SENT_SQLITE: &str = "UPDATE microsoft_outlook_outbox SET status = 'sent', \
     lease_until = NULL, lease_owner = NULL, updated_at = ?1, sent_at = ?1, last_error = NULL, \
     last_reply = v.reply \
     FROM (SELECT value ->> 'id' AS id, value ->> 'reply' AS reply FROM json_each(?2)) AS v \
     WHERE microsoft_outlook_outbox.id = v.id \
     AND (microsoft_outlook_outbox.lease_owner = ?3 OR microsoft_outlook_outbox.status = 'queued')";
/// On PostgreSQL the ids are also given as an array the primary key can look up: with only the
/// join, the planner (which takes a JSON set for 100 rows) read the whole outbox and hashed it
/// for every outcome statement (`auto_explain` during a serve run: 9,637 rows read for 37
/// written, 7.8 ms), a cost that grows with the outbox's history.
const SENT_POSTGRES: &str = "UPDATE microsoft_outlook_outbox AS o SET status = 'sent', \
     lease_until = NULL, lease_owner = NULL, updated_at = $1, sent_at = $1, last_error = NULL, \
     last_reply = v.reply \
     FROM json_to_recordset($2::json) AS v(id bigint, reply text) \
     WHERE o.id = v.id \
     AND o.id = ANY (ARRAY(SELECT (e ->> 'id')::bigint FROM json_array_elements($2::json) AS e)) \
     AND (o.lease_owner = $3 OR o.status = 'queued')";

/// Marks `members` sent, each with its server's reply, where `owner` still holds the claim or
/// the sweep put the mail back in the queue meanwhile (the server took it: it is sent).
///
/// One statement whose text does not depend on the number of mails: the builder's form (an
/// `IN` list and a `CASE` of one branch per mail) was a new statement for the database to
/// parse and plan at nearly every group size.
async fn write_sent(
    db: &sea_orm::DatabaseConnection,
    owner: &str,
    now: DateTime<Utc>,
    members: &[&Outcome],
) -> Result<(), sea_orm::DbErr> {
    let pairs: Vec<serde_json::Value> = members
        .iter()
        .map(|o| serde_json::json!({ "id": o.id, "reply": o.last_reply }))
        .collect();
    let pairs = serde_json::Value::Array(pairs).to_string();
    let backend = db.get_database_backend();
    let sql = match backend {
        sea_orm::DbBackend::Postgres => SENT_POSTGRES,
        _ => SENT_SQLITE,
    };
    let statement = sea_orm::Statement::from_sql_and_values(
        backend,
        sql,
        [now.into(), pairs.into(), owner.into()],
    );
    db.execute_raw(statement).await?;
    Ok(())
}
