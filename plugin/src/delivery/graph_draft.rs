//! Graph's way for a message over its 4 MB request limit (MICROSOFT.md › Microsoft Graph mail):
//! a draft of the message without its files, each file added (one request under
//! [`UPLOAD_SESSION_FROM`], else an upload session in [`UPLOAD_CHUNK`] chunks), then `send`.

use base64::Engine;
use secrecy::ExposeSecret;

use crate::delivery::graph::{
    Answer, GraphSender, UPLOAD_CHUNK, UPLOAD_SESSION_FROM, by_internet_message_id, reply_of, words,
};
use crate::delivery::graph_replies::GraphReply;
use crate::delivery::transport::Batch;

/// `{url}/messages/{id}`, the id encoded for a path segment.
fn message_url(url: &str, id: &str) -> String {
    format!(
        "{url}/messages/{}",
        url::form_urlencoded::byte_serialize(id.as_bytes()).collect::<String>()
    )
}

/// The ids of the messages of a Graph list answer (`value`) created before `before`; `None`
/// when the answer has no list.
fn made_before(
    answer: &serde_json::Value,
    before: chrono::DateTime<chrono::Utc>,
) -> Option<Vec<String>> {
    let made = |m: &serde_json::Value| {
        m["createdDateTime"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .is_some_and(|t| t < before)
    };
    let items = answer["value"].as_array()?;
    Some(
        items
            .iter()
            .filter(|m| made(m))
            .filter_map(|m| m["id"].as_str().map(str::to_string))
            .collect(),
    )
}

/// How much older than a batch's claim a draft must be for the batch to take it as an earlier
/// attempt's (room for the clocks of this host and of Microsoft to differ).
const STALE_DRAFT_MARGIN: chrono::Duration = chrono::Duration::seconds(60);

impl GraphSender {
    /// A message over the request limit: a draft of the message without its files, each file
    /// added (a single POST under [`UPLOAD_SESSION_FROM`], else an upload session in chunks),
    /// then `send`. A draft left by a failure is deleted (best effort).
    pub(crate) async fn send_as_draft(&self, url: &str, batch: &Batch<'_>, raw: &str) -> Answer {
        let Some((rest, files)) = split_files(raw) else {
            return Answer::Refused(GraphReply {
                status: 400,
                code: "ErrorMimeContentInvalid".into(),
                message: "the stored message could not be split into its text and files".into(),
                retry_after_secs: None,
            });
        };
        let bearer = batch.token.token.expose_secret();
        let b64 = base64::engine::general_purpose::STANDARD;
        let draft = self
            .http
            .post(format!("{url}/messages"))
            .bearer_auth(bearer)
            .header("content-type", "text/plain")
            .body(b64.encode(rest.as_bytes()))
            .send()
            .await;
        let id = match draft {
            Ok(r) if r.status().as_u16() == 201 => {
                let v: serde_json::Value = r.json().await.unwrap_or_default();
                match v["id"].as_str() {
                    Some(id) => id.to_string(),
                    None => return Answer::Unknown("the draft's id is missing".into()),
                }
            }
            Ok(r) => return Answer::Refused(reply_of(r).await),
            Err(e) if e.is_connect() => return Answer::Unreachable(words(e)),
            Err(e) => return Answer::Unknown(words(e)),
        };
        let item = message_url(url, &id);
        for (name, content_type, bytes) in &files {
            let added = if bytes.len() < UPLOAD_SESSION_FROM {
                self.attach_small(&item, bearer, name, content_type, bytes)
                    .await
            } else {
                self.attach_large(&item, bearer, name, content_type, bytes)
                    .await
            };
            if let Err(answer) = added {
                let _ = self.http.delete(&item).bearer_auth(bearer).send().await;
                return answer;
            }
        }
        match self
            .http
            .post(format!("{item}/send"))
            .bearer_auth(bearer)
            .header("content-length", "0")
            .send()
            .await
        {
            Ok(r) if r.status().as_u16() == 202 => {
                Answer::Sent("202 Accepted (draft with upload sessions)".into())
            }
            Ok(r) => {
                let reply = reply_of(r).await;
                let _ = self.http.delete(&item).bearer_auth(bearer).send().await;
                Answer::Refused(reply)
            }
            Err(e) if e.is_connect() => {
                let _ = self.http.delete(&item).bearer_auth(bearer).send().await;
                Answer::ConnectionLost(words(e))
            }
            Err(e) => Answer::Unknown(words(e)),
        }
    }

    /// Deletes the mailbox's drafts of `message_id` made before this batch was claimed (`GET
    /// {url}/mailFolders/Drafts/messages` filtered by `internetMessageId`, then `DELETE
    /// {url}/messages/{id}` for each whose `createdDateTime` is over [`STALE_DRAFT_MARGIN`]
    /// older than the claim), so that an attempt that died between making its draft and sending
    /// it leaves nothing in the mailbox's Drafts once the mail is sent. A draft made after the
    /// claim is never touched: it may be a later attempt's, should this one have lost its claim
    /// without knowing. Best effort: a failure is logged, and the mail is sent all the same.
    pub(crate) async fn delete_drafts_of(&self, url: &str, batch: &Batch<'_>, message_id: &str) {
        if batch.halt.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let before = batch.claimed_at - STALE_DRAFT_MARGIN;
        let bearer = batch.token.token.expose_secret();
        let filter = by_internet_message_id(message_id);
        let found = self
            .http
            .get(format!("{url}/mailFolders/Drafts/messages"))
            .query(&[
                ("$filter", filter.as_str()),
                ("$select", "id,createdDateTime"),
            ])
            .bearer_auth(bearer)
            .send()
            .await;
        let listed = match found {
            Ok(r) if r.status().is_success() => r
                .json::<serde_json::Value>()
                .await
                .ok()
                .and_then(|v| made_before(&v, before)),
            Ok(r) => {
                let reply = reply_of(r).await;
                tracing::warn!(status = reply.status, code = %reply.code, "looking for an earlier attempt's draft failed");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %words(e), "looking for an earlier attempt's draft failed");
                return;
            }
        };
        let Some(ids) = listed else {
            tracing::warn!("the list of an earlier attempt's drafts could not be read");
            return;
        };
        for id in ids {
            let item = message_url(url, &id);
            match self.http.delete(&item).bearer_auth(bearer).send().await {
                Ok(r) if r.status().is_success() => {
                    tracing::info!("an earlier attempt's draft was deleted");
                }
                Ok(r) => tracing::warn!(
                    status = r.status().as_u16(),
                    "an earlier attempt's draft could not be deleted"
                ),
                Err(e) => {
                    tracing::warn!(error = %words(e), "an earlier attempt's draft could not be deleted")
                }
            }
        }
    }

    /// `POST {item}/attachments` with a `fileAttachment` (base64 `contentBytes`).
    async fn attach_small(
        &self,
        item: &str,
        bearer: &str,
        name: &str,
        content_type: &str,
        bytes: &[u8],
    ) -> Result<(), Answer> {
        let body = serde_json::json!({
            "@odata.type": "#microsoft.graph.fileAttachment",
            "name": name,
            "contentType": content_type,
            "contentBytes": base64::engine::general_purpose::STANDARD.encode(bytes),
        });
        match self
            .http
            .post(format!("{item}/attachments"))
            .bearer_auth(bearer)
            .json(&body)
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(Answer::Refused(reply_of(r).await)),
            Err(e) if e.is_connect() => Err(Answer::ConnectionLost(words(e))),
            Err(e) => Err(Answer::Unknown(words(e))),
        }
    }

    /// An upload session for one file: `createUploadSession`, then `PUT`s of
    /// [`UPLOAD_CHUNK`] bytes with `Content-Range` to the session's URL (no bearer token there).
    async fn attach_large(
        &self,
        item: &str,
        bearer: &str,
        name: &str,
        content_type: &str,
        bytes: &[u8],
    ) -> Result<(), Answer> {
        let session = serde_json::json!({"AttachmentItem": {
            "attachmentType": "file", "name": name, "size": bytes.len(), "contentType": content_type,
        }});
        let upload_url = match self
            .http
            .post(format!("{item}/attachments/createUploadSession"))
            .bearer_auth(bearer)
            .json(&session)
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => {
                let v: serde_json::Value = r.json().await.unwrap_or_default();
                v["uploadUrl"]
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| Answer::Unknown("the upload session has no uploadUrl".into()))?
            }
            Ok(r) => return Err(Answer::Refused(reply_of(r).await)),
            Err(e) if e.is_connect() => return Err(Answer::ConnectionLost(words(e))),
            Err(e) => return Err(Answer::Unknown(words(e))),
        };
        let total = bytes.len();
        for (k, chunk) in bytes.chunks(UPLOAD_CHUNK).enumerate() {
            let from = k * UPLOAD_CHUNK;
            let range = format!("bytes {from}-{}/{total}", from + chunk.len() - 1);
            match self
                .http
                .put(&upload_url)
                .header("content-range", range)
                .body(chunk.to_vec())
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => return Err(Answer::Refused(reply_of(r).await)),
                Err(e) if e.is_connect() => return Err(Answer::ConnectionLost(words(e))),
                Err(e) => return Err(Answer::Unknown(words(e))),
            }
        }
        Ok(())
    }
}

/// A file taken out of a message: name, content type, decoded bytes.
pub type File = (String, String, Vec<u8>);

/// The files of a message and the message without them: the draft's MIME stays under Graph's
/// request limit, and each file goes on its own (MICROSOFT.md: a draft, its attachments, then
/// send). A file is (name, content type, decoded bytes).
pub fn split_files(raw: &str) -> Option<(String, Vec<File>)> {
    use mail_parser::{MessageParser, MimeHeaders};
    let message = MessageParser::default().parse(raw.as_bytes())?;
    let mut cuts: Vec<(usize, usize)> = Vec::new();
    let mut files = Vec::new();
    for part in message.attachments() {
        let start = part.offset_header as usize;
        let end = part.offset_end as usize;
        // The delimiter line before the part ("\r\n--boundary\r\n") goes with it.
        let delimiter = raw.get(..start)?.rfind("\r\n--")?;
        cuts.push((delimiter, end));
        let content_type = part
            .content_type()
            .map(|t| match t.subtype() {
                Some(sub) => format!("{}/{sub}", t.ctype()),
                None => t.ctype().to_string(),
            })
            .unwrap_or_else(|| "application/octet-stream".into());
        // The bytes as sent: the part's base64 undone, not decoded by charset (a text file in
        // Windows-1252 stays as it is); other transfer encodings as the parser decodes them.
        let bytes = match part.content_transfer_encoding() {
            Some(cte) if cte.eq_ignore_ascii_case("base64") => {
                let body: Vec<u8> = raw
                    .get(part.offset_body as usize..end)?
                    .bytes()
                    .filter(|b| !b.is_ascii_whitespace())
                    .collect();
                base64::engine::general_purpose::STANDARD
                    .decode(body)
                    .ok()?
            }
            _ => part.contents().to_vec(),
        };
        files.push((
            part.attachment_name().unwrap_or("attachment").to_string(),
            content_type,
            bytes,
        ));
    }
    let mut rest = String::with_capacity(raw.len());
    let mut at = 0;
    for (from, to) in cuts {
        rest.push_str(raw.get(at..from)?);
        at = to;
    }
    rest.push_str(raw.get(at..)?);
    Some((rest, files))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lettre::message::header::ContentType;
    use lettre::message::{Attachment, MultiPart, SinglePart};

    #[test]
    fn a_message_splits_into_its_text_and_its_files() {
        let pdf = vec![0x25u8, 0x50, 0, 0xff, 13, 10, 46];
        let message = lettre::Message::builder()
            .from("a@contoso.example".parse().expect("from"))
            .to("b@fabrikam.example".parse().expect("to"))
            .subject("Files")
            .message_id(Some("<m1@crm.example>".into()))
            .multipart(
                MultiPart::mixed()
                    .singlepart(SinglePart::plain("Hello".to_string()))
                    .singlepart(Attachment::new("Grüße.pdf".into()).body(
                        pdf.clone(),
                        ContentType::parse("application/pdf").expect("pdf"),
                    ))
                    .singlepart(
                        Attachment::new("b.txt".into())
                            .body(b"two".to_vec(), ContentType::TEXT_PLAIN),
                    ),
            )
            .expect("message");
        let raw = String::from_utf8(message.formatted()).expect("ascii");
        let (rest, files) = split_files(&raw).expect("splits");
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].0, "Grüße.pdf");
        assert_eq!(files[0].1, "application/pdf");
        assert_eq!(files[0].2, pdf);
        assert_eq!(files[1].2, b"two");
        let parsed = mail_parser::MessageParser::default()
            .parse(rest.as_bytes())
            .expect("the rest parses");
        assert_eq!(parsed.attachments().count(), 0);
        assert_eq!(parsed.body_text(0).as_deref().map(str::trim), Some("Hello"));
        assert_eq!(parsed.message_id(), Some("m1@crm.example"));
    }
}
