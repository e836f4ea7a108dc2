//! The outbox's filter: what the list shows, as a query string and as a database condition.

use super::*;

/// The filter of the list, as typed (every field may be empty).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct Filter {
    /// `queued`, `sending`, `sent`, `failed` or `cancelled`.
    #[serde(default)]
    pub status: String,
    /// A mail server's id.
    #[serde(default)]
    pub server: String,
    /// An author's user id (operators).
    #[serde(default)]
    pub author: String,
    /// `model:id`, e.g. `contact:12`.
    #[serde(default)]
    pub record: String,
    /// Queued on or after this day (`YYYY-MM-DD`, UTC).
    #[serde(default)]
    pub from: String,
    /// Queued on or before this day.
    #[serde(default)]
    pub to: String,
    /// Part of a recipient, the subject or the Message-ID.
    #[serde(default)]
    pub q: String,
}

pub(super) fn field_error(field: &str, message: String) -> FieldError {
    FieldError {
        field: field.into(),
        message,
    }
}

/// The case forms of `c` that are one character each (`ä` → `ä`, `Ä`), `c` first.
pub(super) fn case_forms(c: char) -> Vec<char> {
    fn single(mut chars: impl Iterator<Item = char>) -> Option<char> {
        let first = chars.next()?;
        chars.next().is_none().then_some(first)
    }
    let mut forms = vec![c];
    for f in [single(c.to_lowercase()), single(c.to_uppercase())]
        .into_iter()
        .flatten()
    {
        if !forms.contains(&f) {
            forms.push(f);
        }
    }
    forms
}

/// "Contains `text`, whatever the case", matched by the database itself on both backends.
/// Neither SQLite's `LIKE` nor its `lower()` knows the case of non-ASCII letters (`Ä`), so
/// every cased letter is matched by the set of its forms: a `GLOB` on SQLite, a regular
/// expression (`~`) on PostgreSQL (which, unlike its `lower()`, does not depend on the
/// cluster's locale). Every other character matches as itself.
pub(super) fn contains_any_case(
    backend: DbBackend,
    column: outbox::Column,
    text: &str,
) -> sea_orm::sea_query::SimpleExpr {
    let mut pattern = String::new();
    let postgres = backend == DbBackend::Postgres;
    if !postgres {
        pattern.push('*');
    }
    for c in text.chars() {
        let forms = case_forms(c);
        if forms.len() > 1 {
            pattern.push('[');
            pattern.extend(forms);
            pattern.push(']');
        } else if postgres && !c.is_alphanumeric() {
            // In a PostgreSQL regular expression `\` and a non-alphanumeric character is
            // that character.
            pattern.push('\\');
            pattern.push(c);
        } else if !postgres && matches!(c, '*' | '?' | '[') {
            // In a GLOB, a set of one is that character.
            pattern.extend(['[', c, ']']);
        } else {
            pattern.push(c);
        }
    }
    if !postgres {
        pattern.push('*');
    }
    let operator = if postgres { "~" } else { "GLOB" };
    Expr::col((outbox::Entity, column)).binary(BinOper::Custom(operator), Expr::val(pattern))
}

impl Filter {
    /// The condition on outbox rows that `viewer` may see and that match on a `backend`
    /// database; or what is wrong.
    pub fn condition(
        &self,
        viewer: &CurrentUser,
        backend: DbBackend,
    ) -> Result<Condition, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut c = Condition::all();
        if !viewer.is_admin {
            c = c.add(outbox::Column::AuthorUserId.eq(viewer.id));
        }
        let status = self.status.trim();
        if !status.is_empty() {
            // Named in the SQL, so that the partial indexes of queued, sending and failed
            // mails serve the list.
            if let Some(named) = outbox::status_named(status) {
                c = c.add(named);
            } else {
                errors.push(field_error("status", format!("no status \"{status}\"")));
            }
        }
        if !self.server.trim().is_empty() {
            match self.server.trim().parse::<i32>() {
                Ok(id) => c = c.add(outbox::Column::ServerId.eq(id)),
                Err(_) => errors.push(field_error("server", "not a mail server id".into())),
            }
        }
        if !self.author.trim().is_empty() {
            match self.author.trim().parse::<i64>() {
                Ok(id) => c = c.add(outbox::Column::AuthorUserId.eq(id)),
                Err(_) => errors.push(field_error("author", "not a user id".into())),
            }
        }
        if !self.record.trim().is_empty() {
            match self
                .record
                .trim()
                .split_once(':')
                .and_then(|(m, id)| Some((m, id.parse::<i64>().ok()?)))
            {
                Some((model, id)) => {
                    c = c
                        .add(outbox::Column::RecordModel.eq(model))
                        .add(outbox::Column::RecordId.eq(id))
                }
                None => errors.push(field_error(
                    "record",
                    "write the record as model:id, e.g. contact:12".into(),
                )),
            }
        }
        let day = |field: &str, text: &str, errors: &mut Vec<FieldError>| {
            let text = text.trim();
            if text.is_empty() {
                return None;
            }
            let parsed = NaiveDate::parse_from_str(text, "%Y-%m-%d").ok();
            if parsed.is_none() {
                errors.push(field_error(field, "a day is written YYYY-MM-DD".into()));
            }
            parsed
        };
        let midnight = |d: NaiveDate| d.and_hms_opt(0, 0, 0).map(|t| t.and_utc());
        if let Some(at) = day("from", &self.from, &mut errors).and_then(midnight) {
            c = c.add(outbox::Column::CreatedAt.gte(at));
        }
        if let Some(at) = day("to", &self.to, &mut errors)
            .and_then(|d| d.succ_opt())
            .and_then(midnight)
        {
            c = c.add(outbox::Column::CreatedAt.lt(at));
        }
        let q = self.q.trim().trim_start_matches('<').trim_end_matches('>');
        if !q.is_empty() {
            c = c.add(
                Condition::any()
                    .add(contains_any_case(backend, outbox::Column::Recipients, q))
                    .add(contains_any_case(backend, outbox::Column::Subject, q))
                    .add(contains_any_case(backend, outbox::Column::MessageId, q)),
            );
        }
        if errors.is_empty() {
            Ok(c)
        } else {
            Err(errors)
        }
    }

    /// The filter as a query string (empty fields left out), with `page` when past the first.
    pub fn query(&self, page: u64) -> String {
        let mut pairs: Vec<(&str, &str)> = [
            ("status", &self.status),
            ("server", &self.server),
            ("author", &self.author),
            ("record", &self.record),
            ("from", &self.from),
            ("to", &self.to),
            ("q", &self.q),
        ]
        .into_iter()
        .filter(|(_, v)| !v.trim().is_empty())
        .map(|(k, v)| (k, v.as_str()))
        .collect();
        let page = page.to_string();
        if page != "1" {
            pairs.push(("page", &page));
        }
        serde_urlencoded::to_string(pairs).unwrap_or_default()
    }

    pub(super) fn hidden_fields(&self) -> Markup {
        html! {
            input type="hidden" name="status" value=(self.status);
            input type="hidden" name="server" value=(self.server);
            input type="hidden" name="author" value=(self.author);
            input type="hidden" name="record" value=(self.record);
            input type="hidden" name="from" value=(self.from);
            input type="hidden" name="to" value=(self.to);
            input type="hidden" name="q" value=(self.q);
        }
    }
}
