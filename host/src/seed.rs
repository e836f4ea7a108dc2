//! The demo data: an operator, two users and a handful of contacts.

use chrono::Utc;
use sea_orm::{ActiveModelTrait, DatabaseConnection, EntityTrait, PaginatorTrait, Set};

use crate::auth::hash_password;
use crate::entities::{contact, user};

/// A demo sign-in.
pub struct DemoLogin {
    /// E-mail address.
    pub email: &'static str,
    /// Password.
    pub password: &'static str,
    /// Whether it is an operator.
    pub is_admin: bool,
}

/// The demo's sign-ins.
pub const DEMO_LOGINS: [DemoLogin; 3] = [
    DemoLogin {
        email: "admin@contoso.example",
        password: "operator-demo",
        is_admin: true,
    },
    DemoLogin {
        email: "alice@contoso.example",
        password: "alice-demo",
        is_admin: false,
    },
    DemoLogin {
        email: "bob@contoso.example",
        password: "bob-demo",
        is_admin: false,
    },
];

/// Creates a user; returns its id.
pub async fn create_user(
    db: &DatabaseConnection,
    email: &str,
    name: &str,
    password: &str,
    is_admin: bool,
) -> anyhow::Result<i64> {
    let created = user::ActiveModel {
        email: Set(email.to_lowercase()),
        name: Set(name.to_string()),
        password_hash: Set(hash_password(password)?),
        is_admin: Set(is_admin),
        created_at: Set(Utc::now()),
        ..Default::default()
    }
    .insert(db)
    .await?;
    Ok(created.id)
}

/// Creates a contact; returns its id.
pub async fn create_contact(
    db: &DatabaseConnection,
    name: &str,
    email: Option<&str>,
    company: Option<&str>,
    owner: i64,
    private: bool,
) -> anyhow::Result<i64> {
    let created = contact::ActiveModel {
        name: Set(name.to_string()),
        email: Set(email.map(str::to_string)),
        company: Set(company.map(str::to_string)),
        owner_user_id: Set(owner),
        private: Set(private),
        created_at: Set(Utc::now()),
        ..Default::default()
    }
    .insert(db)
    .await?;
    Ok(created.id)
}

/// Seeds the demo data unless users exist already.
pub async fn seed_demo(db: &DatabaseConnection) -> anyhow::Result<bool> {
    if user::Entity::find().count(db).await? > 0 {
        return Ok(false);
    }
    let mut ids = Vec::new();
    for (login, name) in DEMO_LOGINS
        .iter()
        .zip(["Olivia Operator", "Alice Adams", "Bob Brown"])
    {
        ids.push(create_user(db, login.email, name, login.password, login.is_admin).await?);
    }
    let contacts = [
        ("Dana Fabrikam", "dana@fabrikam.example", "Fabrikam", false),
        (
            "Evan Northwind",
            "evan@northwind.example",
            "Northwind Traders",
            false,
        ),
        (
            "Fiona Tailspin",
            "fiona@tailspin.example",
            "Tailspin Toys",
            false,
        ),
        (
            "Gus Woodgrove",
            "gus@woodgrove.example",
            "Woodgrove Bank",
            false,
        ),
        ("Hana Private", "hana@litware.example", "Litware", true),
    ];
    for (i, (name, email, company, private)) in contacts.into_iter().enumerate() {
        let owner = ids[1 + i % 2];
        create_contact(db, name, Some(email), Some(company), owner, private).await?;
    }
    Ok(true)
}
