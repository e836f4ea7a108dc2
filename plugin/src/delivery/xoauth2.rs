//! SASL XOAUTH2 as SMTP servers speak it, as pure code: the bytes of each line the client sends
//! and the client's side of the exchange, apart from any connection.
//!
//! - The initial response is `base64("user=" mailbox "\x01auth=Bearer " token "\x01\x01")`
//!   (Google's and Microsoft's XOAUTH2 descriptions).
//! - A command line is at most 1,000 octets with its CRLF (RFC 5321 §4.5.3.1.4). When
//!   `AUTH XOAUTH2 <response>` would be longer, the client sends `AUTH XOAUTH2` alone and the
//!   response after the server's empty `334 ` challenge (RFC 4954 §4).
//! - A server that refuses the token may answer the response with `334 <base64 JSON>` (an
//!   error challenge: `{"status":"401","schemes":"bearer","scope":"..."}`). The client answers
//!   with an empty line and then reads the final reply (`535`, `454`, ...).

use base64::Engine as _;
use secrecy::{ExposeSecret, SecretString};

/// The longest command line, CRLF included (RFC 5321 §4.5.3.1.4).
pub const MAX_COMMAND_LINE: usize = 1000;

/// The decoded XOAUTH2 initial response, byte for byte.
pub fn initial_response(user: &str, token: &str) -> Vec<u8> {
    format!("user={user}\x01auth=Bearer {token}\x01\x01").into_bytes()
}

/// A line to write, CRLF included; its `Debug` never shows the bearer token.
pub struct Line(SecretString);

impl Line {
    fn new(text: String) -> Self {
        Self(SecretString::from(text))
    }

    /// The bytes to write.
    pub fn as_str(&self) -> &str {
        self.0.expose_secret()
    }
}

impl std::fmt::Debug for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = self.as_str();
        if text.starts_with("AUTH XOAUTH2 ") {
            f.write_str("Line(\"AUTH XOAUTH2 <response>\")")
        } else if text == "\r\n" || text.starts_with("AUTH") {
            write!(f, "Line({text:?})")
        } else {
            f.write_str("Line(<response>)")
        }
    }
}

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the exchange stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// `AUTH XOAUTH2 <response>` was sent.
    SentWithResponse,
    /// `AUTH XOAUTH2` was sent alone; the response follows the `334`.
    SentAlone,
    /// The response was sent after the `334`.
    SentResponse,
    /// An error challenge was answered with an empty line.
    AcknowledgedError,
    Done,
}

/// What to do after a reply.
#[derive(Debug)]
pub enum Step {
    /// Write this line and read the next reply.
    Send(Line),
    /// Authenticated (`235`).
    Authenticated,
    /// Refused: the final reply, and the server's decoded error challenge if it sent one.
    Refused {
        /// The final reply's code.
        code: u16,
        /// The final reply as on the wire.
        reply: String,
        /// The JSON of a `334` error challenge, decoded.
        challenge: Option<String>,
    },
}

/// The client's side of one XOAUTH2 exchange.
pub struct Exchange {
    response: SecretString,
    state: State,
    challenge: Option<String>,
}

impl Exchange {
    /// An exchange authenticating `user` with `token`.
    pub fn new(user: &str, token: &SecretString) -> Self {
        let raw = initial_response(user, token.expose_secret());
        let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
        Self {
            response: SecretString::from(encoded),
            state: State::Done,
            challenge: None,
        }
    }

    /// The first line: with the initial response when it fits in [`MAX_COMMAND_LINE`].
    pub fn start(&mut self) -> Line {
        let with_response = format!("AUTH XOAUTH2 {}\r\n", self.response.expose_secret());
        if with_response.len() <= MAX_COMMAND_LINE {
            self.state = State::SentWithResponse;
            Line::new(with_response)
        } else {
            self.state = State::SentAlone;
            Line::new("AUTH XOAUTH2\r\n".into())
        }
    }

    /// The next step after a reply with `code` and the whole `text` (`334 eyJ...`).
    pub fn on_reply(&mut self, code: u16, text: &str) -> Step {
        match (self.state, code) {
            (_, 235) => {
                self.state = State::Done;
                Step::Authenticated
            }
            (State::SentAlone, 334) => {
                self.state = State::SentResponse;
                Line::new(format!("{}\r\n", self.response.expose_secret())).into()
            }
            (State::SentWithResponse | State::SentResponse, 334) => {
                // An error challenge: acknowledge it with an empty line, then the final reply.
                self.challenge = decode_challenge(text);
                self.state = State::AcknowledgedError;
                Line::new("\r\n".into()).into()
            }
            (State::AcknowledgedError, 334) => {
                // A second challenge: cancel the exchange (RFC 4954 §4: a line of "*").
                self.state = State::Done;
                Line::new("*\r\n".into()).into()
            }
            _ => {
                self.state = State::Done;
                Step::Refused {
                    code,
                    reply: text.to_string(),
                    challenge: self.challenge.take(),
                }
            }
        }
    }
}

impl From<Line> for Step {
    fn from(line: Line) -> Self {
        Step::Send(line)
    }
}

/// The decoded text of a `334 <base64>` challenge, when it is base64 of UTF-8.
fn decode_challenge(text: &str) -> Option<String> {
    let payload = text.get(3..)?.trim();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(payload)
        .ok()?;
    String::from_utf8(bytes).ok().filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(len: usize) -> SecretString {
        SecretString::from("t".repeat(len))
    }

    #[test]
    fn the_initial_response_bytes() {
        assert_eq!(
            initial_response("crm@contoso.example", "abc"),
            b"user=crm@contoso.example\x01auth=Bearer abc\x01\x01".to_vec()
        );
    }

    #[test]
    fn a_short_token_goes_on_the_auth_line() {
        let mut x = Exchange::new("crm@contoso.example", &SecretString::from("abc"));
        let line = x.start();
        assert_eq!(
            line.as_str(),
            "AUTH XOAUTH2 dXNlcj1jcm1AY29udG9zby5leGFtcGxlAWF1dGg9QmVhcmVyIGFiYwEB\r\n"
        );
        assert!(matches!(
            x.on_reply(235, "235 2.7.0 Authentication successful"),
            Step::Authenticated
        ));
    }

    #[test]
    fn a_long_token_follows_the_334() {
        let mut x = Exchange::new("crm@contoso.example", &token(2400));
        let first = x.start();
        assert_eq!(first.as_str(), "AUTH XOAUTH2\r\n");
        let Step::Send(response) = x.on_reply(334, "334 ") else {
            panic!("the response must follow the 334");
        };
        let encoded = response.as_str().trim_end_matches("\r\n");
        assert!(response.as_str().ends_with("\r\n"));
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap_or_default();
        assert_eq!(
            decoded,
            initial_response("crm@contoso.example", &"t".repeat(2400))
        );
        assert!(matches!(
            x.on_reply(235, "235 2.7.0 Authentication successful"),
            Step::Authenticated
        ));
    }

    #[test]
    fn the_limit_is_a_thousand_octets_with_crlf() {
        // "AUTH XOAUTH2 " (13) + base64 + CRLF (2) <= 1000.
        let fits = (1..2000)
            .map(|n| {
                let mut x = Exchange::new("a@b.c", &token(n));
                (n, x.start().as_str().len())
            })
            .filter(|(_, len)| *len > 14)
            .map(|(_, len)| len)
            .max()
            .unwrap_or(0);
        assert!(fits <= MAX_COMMAND_LINE);
        assert!(fits > MAX_COMMAND_LINE - 4);
    }

    #[test]
    fn an_error_challenge_is_answered_with_an_empty_line() {
        let mut x = Exchange::new("crm@contoso.example", &SecretString::from("stale"));
        x.start();
        let step = x.on_reply(
            334,
            "334 eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJtYWlsIn0=",
        );
        let Step::Send(empty) = step else {
            panic!("an empty line must answer the challenge");
        };
        assert_eq!(empty.as_str(), "\r\n");
        match x.on_reply(535, "535 5.7.8 Username and Password not accepted") {
            Step::Refused {
                code,
                reply,
                challenge,
            } => {
                assert_eq!(code, 535);
                assert_eq!(reply, "535 5.7.8 Username and Password not accepted");
                assert_eq!(
                    challenge.as_deref(),
                    Some(r#"{"status":"401","schemes":"bearer","scope":"mail"}"#)
                );
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_second_challenge_cancels() {
        let mut x = Exchange::new("u@x.y", &SecretString::from("t"));
        x.start();
        x.on_reply(334, "334 e30=");
        let Step::Send(cancel) = x.on_reply(334, "334 e30=") else {
            panic!("a second challenge must be cancelled");
        };
        assert_eq!(cancel.as_str(), "*\r\n");
        assert!(matches!(
            x.on_reply(501, "501 5.7.0 Cancelled"),
            Step::Refused { code: 501, .. }
        ));
    }

    #[test]
    fn debug_never_shows_the_token() {
        let mut x = Exchange::new("u@x.y", &SecretString::from("very-secret-token"));
        let line = x.start();
        assert!(!format!("{line:?}").contains("dmVyeS1zZWNyZXQ"));
    }
}
