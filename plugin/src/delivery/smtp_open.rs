//! Opening an SMTP connection for a mailbox: TCP (with TCP_NODELAY), TLS from the start where
//! the server is so configured ([`crate::delivery::smtp_tls`]), the greeting and EHLO, STARTTLS
//! where the server is so configured, EHLO once more to learn whether it pipelines, then SASL
//! XOAUTH2 as the mailbox's address or the signed-in identity. Each step that succeeds is
//! noted, for the "Test connection" page.

use crm_sdk::ModuleContext;
use lettre::transport::smtp::authentication::Mechanism;
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use std::time::Duration;
use tokio::net::TcpStream;

use crate::delivery::classify::Stage;
use crate::delivery::smtp_transaction::{
    Line, SendOutcome, SmtpFailure, Verbatim, failure, response_text,
};
use crate::entities::{mail_server, token};
use crate::tokens::store::AccessToken;

/// How long opening a connection (connect, greeting, EHLO, STARTTLS, AUTH: all of it) and one
/// mail's whole transaction (MAIL FROM to the reply after the content) may each take, unless
/// [`crate::runtime::ModuleOptions::smtp_timeout`] says otherwise.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// How far opening a connection got: each step that succeeded, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reached {
    /// Nothing yet (no slot, or the TCP connection failed).
    Nothing,
    /// The TCP connection is open.
    Connected,
    /// TLS is up from the start (security "TLS from the start"), before any greeting.
    Handshaken,
    /// The server greeted and answered EHLO.
    Greeted,
    /// TLS is up (STARTTLS, or TLS from the start).
    Secured,
    /// AUTH XOAUTH2 succeeded.
    Authenticated,
}

/// One SASL XOAUTH2 exchange on `conn` as `user` (the exchange itself is [`crate::delivery::xoauth2`]).
async fn authenticate(
    conn: &mut AsyncSmtpConnection,
    user: &str,
    token: &secrecy::SecretString,
) -> Result<(), SmtpFailure> {
    let mut exchange = crate::delivery::xoauth2::Exchange::new(user, token);
    let mut line = exchange.start();
    loop {
        let (code, text) = match conn.command(Verbatim(line.as_str())).await {
            Ok(response) => (
                response.code().to_string().parse().unwrap_or(0),
                response_text(&response),
            ),
            Err(e) => match e.status() {
                Some(_) => {
                    let f = failure(Stage::Auth, &e);
                    (f.code.unwrap_or(0), f.text)
                }
                None => {
                    let mut f = failure(Stage::Auth, &e);
                    f.auth_user = user.to_string();
                    return Err(f);
                }
            },
        };
        match exchange.on_reply(code, &text) {
            crate::delivery::xoauth2::Step::Send(next) => line = next,
            crate::delivery::xoauth2::Step::Authenticated => return Ok(()),
            crate::delivery::xoauth2::Step::Refused {
                code,
                reply,
                challenge,
            } => {
                return Err(SmtpFailure {
                    stage: Stage::Auth,
                    code: Some(code),
                    text: match challenge {
                        Some(json) => format!("{reply} (after the challenge {json})"),
                        None => reply,
                    },
                    no_xoauth2: false,
                    needs_smtputf8: false,
                    auth_user: user.to_string(),
                });
            }
        }
    }
}

/// Opens a connection and authenticates, noting in `reached` each step that succeeded; a
/// server that stops answering (at the greeting, EHLO, STARTTLS or AUTH) fails it after
/// `timeout` ([`IO_TIMEOUT`] by default) instead of keeping the connection slot.
pub(crate) async fn open(
    (hello, timeout): (&ClientId, Duration),
    ctx: &ModuleContext,
    server: &mail_server::Model,
    token: &AccessToken,
    reached: &mut Reached,
) -> Result<Line, SendOutcome> {
    let opened = tokio::time::timeout(
        timeout,
        open_unbounded((hello, timeout), ctx, server, token, reached),
    )
    .await;
    opened.unwrap_or_else(|_| {
        let stage = if *reached >= Reached::Secured {
            Stage::Auth
        } else {
            Stage::Connect
        };
        Err(SendOutcome::Failed(SmtpFailure::network(
            stage,
            "the SMTP server stopped answering".into(),
        )))
    })
}

async fn open_unbounded(
    (hello, timeout): (&ClientId, Duration),
    ctx: &ModuleContext,
    server: &mail_server::Model,
    token: &AccessToken,
    reached: &mut Reached,
) -> Result<Line, SendOutcome> {
    let conn = connect((hello, timeout), server, reached)
        .await
        .map_err(SendOutcome::Failed)?;
    let mut line = Line::open(conn, hello)
        .await
        .map_err(|e| SendOutcome::Failed(failure(Stage::Connect, &e)))?;
    if !line
        .conn
        .server_info()
        .supports_auth_mechanism(Mechanism::Xoauth2)
    {
        return Err(SendOutcome::Failed(SmtpFailure {
            no_xoauth2: true,
            ..SmtpFailure::network(Stage::Auth, "AUTH XOAUTH2 is not offered".into())
        }));
    }
    // The mailbox's address first (or the identity that worked before), then the signed-in
    // UPN: Exchange maps either to the mailbox, other servers only one of them.
    let mut refused = None;
    for (i, user) in token.identities.iter().enumerate() {
        match authenticate(&mut line.conn, user, &token.token).await {
            Ok(()) => {
                if i > 0 {
                    remember_identity(ctx, server.id, user).await;
                }
                *reached = Reached::Authenticated;
                return Ok(line);
            }
            Err(f) if f.refused_token() => refused = Some(f),
            // The line dropped after a refusal: the refusal is what was learnt.
            Err(f) => return Err(SendOutcome::Failed(refused.unwrap_or(f))),
        }
    }
    Err(SendOutcome::Failed(refused.unwrap_or_else(|| {
        SmtpFailure::network(Stage::Auth, "no identity to authenticate as".into())
    })))
}

/// Connects, reads the greeting, says EHLO and starts TLS as the server is configured,
/// noting in `reached` each step that succeeded.
async fn connect(
    (hello, timeout): (&ClientId, Duration),
    server: &mail_server::Model,
    reached: &mut Reached,
) -> Result<AsyncSmtpConnection, SmtpFailure> {
    let smtp = |e: lettre::transport::smtp::Error| failure(Stage::Connect, &e);
    let tls = || -> Result<TlsParameters, lettre::transport::smtp::Error> {
        let mut builder = TlsParameters::builder(server.smtp_host.clone());
        if let Some(pem) = &server.extra_ca_pem {
            builder = builder.add_root_certificate(Certificate::from_pem(pem.as_bytes())?);
        }
        builder.build_rustls()
    };
    let address = format!("{}:{}", server.smtp_host, server.smtp_port);
    let network = |text: String| SmtpFailure::network(Stage::Connect, text);
    let tcp = match tokio::time::timeout(timeout, TcpStream::connect(address.as_str())).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Err(network(format!("cannot connect to {address}: {e}"))),
        Err(_) => return Err(network(format!("connecting to {address} timed out"))),
    };
    // lettre never sets TCP_NODELAY; without it each message waits ~40 ms for a delayed ACK.
    tcp.set_nodelay(true)
        .map_err(|e| network(format!("setting TCP_NODELAY: {e}")))?;
    *reached = Reached::Connected;
    if server.security == "tls" {
        let tls = crate::delivery::smtp_tls::handshake(
            tcp,
            &server.smtp_host,
            server.extra_ca_pem.as_deref(),
        )
        .await
        .map_err(|e| network(e.0))?;
        *reached = Reached::Handshaken;
        let conn = AsyncSmtpConnection::connect_with_transport(Box::new(tls), hello)
            .await
            .map_err(smtp)?;
        // Greeted over TLS: nothing more to secure.
        *reached = Reached::Secured;
        return Ok(conn);
    }
    let mut conn = AsyncSmtpConnection::connect_with_transport(Box::new(tcp), hello)
        .await
        .map_err(smtp)?;
    *reached = Reached::Greeted;
    if server.security == "starttls" {
        conn.starttls(tls().map_err(smtp)?, hello)
            .await
            .map_err(smtp)?;
        *reached = Reached::Secured;
    }
    Ok(conn)
}

/// Remembers the identity SMTP AUTH accepted for a mailbox (tried first from then on).
async fn remember_identity(ctx: &ModuleContext, server_id: i32, user: &str) {
    let stored = token::Entity::update_many()
        .col_expr(token::Column::SmtpUser, Expr::value(user.to_string()))
        .filter(token::Column::ServerId.eq(server_id))
        .exec(ctx.db())
        .await;
    match stored {
        Ok(_) => tracing::info!(server_id, "SMTP AUTH accepted the signed-in identity"),
        Err(e) => tracing::warn!(error = %e, "remembering the SMTP identity failed"),
    }
}
