//! Whether the database can be reached: an error that says it could not (a pool that gave no
//! connection, a connection lost, PostgreSQL shutting down) is told from one that refused a
//! statement. Outcomes after the first kind are tried for as long as the process lives, and
//! the sweep takes no claim over until its process has reached the database for a while
//! ([`crate::runtime::Shared::db_steady_for`]).

/// Whether `e` says the database could not be reached, rather than that it refused the
/// statement: no connection from the pool within its acquire timeout, a connection lost or
/// reset (I/O, TLS), or PostgreSQL's connection exceptions (SQLSTATE class 08) and operator
/// intervention (57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot connect now). A
/// closed pool, a refused sign-in (28P01), a missing database (3D000), a statement error and
/// SQLite's own errors are refusals: trying again would not help.
pub fn is_unreachable(e: &sea_orm::DbErr) -> bool {
    use sea_orm::sqlx::Error;
    use sea_orm::{ConnAcquireErr, DbErr, RuntimeErr};
    match e {
        DbErr::ConnectionAcquire(ConnAcquireErr::Timeout) => true,
        DbErr::Conn(RuntimeErr::SqlxError(e))
        | DbErr::Exec(RuntimeErr::SqlxError(e))
        | DbErr::Query(RuntimeErr::SqlxError(e)) => match e.as_ref() {
            Error::Io(_) | Error::Tls(_) | Error::PoolTimedOut => true,
            Error::Database(d) => d
                .code()
                .is_some_and(|c| c.starts_with("08") || matches!(&*c, "57P01" | "57P02" | "57P03")),
            _ => false,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::is_unreachable;
    use sea_orm::sqlx::Error;
    use sea_orm::{ConnAcquireErr, ConnectionTrait, DbErr, RuntimeErr};
    use std::sync::Arc;

    fn sqlx(e: Error) -> DbErr {
        DbErr::Exec(RuntimeErr::SqlxError(Arc::new(e)))
    }

    #[test]
    fn a_database_out_of_reach_is_told_from_a_refused_statement() {
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(is_unreachable(&DbErr::ConnectionAcquire(
            ConnAcquireErr::Timeout
        )));
        assert!(is_unreachable(&sqlx(Error::Io(reset))));
        assert!(is_unreachable(&sqlx(Error::PoolTimedOut)));
        assert!(!is_unreachable(&sqlx(Error::RowNotFound)));
        assert!(!is_unreachable(&sqlx(Error::Protocol(
            "bad statement".into()
        ))));
        assert!(!is_unreachable(&DbErr::ConnectionAcquire(
            ConnAcquireErr::ConnectionClosed
        )));
        assert!(!is_unreachable(&DbErr::Conn(RuntimeErr::Internal(
            "Disconnected".into()
        ))));
        assert!(!is_unreachable(&DbErr::Exec(RuntimeErr::Internal(
            "no such column".into()
        ))));
        assert!(!is_unreachable(&DbErr::RecordNotFound("outbox".into())));
    }

    #[tokio::test]
    async fn a_statement_the_database_refuses_is_not_unreachable() {
        let db = sea_orm::Database::connect("sqlite::memory:")
            .await
            .expect("in-memory SQLite");
        let e = db
            .execute_unprepared("UPDATE no_such_table SET x = 1")
            .await
            .expect_err("no such table");
        assert!(!is_unreachable(&e), "{e}");
    }
}
