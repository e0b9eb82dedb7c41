//! Cron entries compiled from config: the parsed schedule, its time zone and the body to
//! publish at each tick.

use std::sync::Arc;

use bytes::Bytes;

use crate::config::CronConfig;

/// A validated cron entry.
#[derive(Debug)]
pub struct CronSpec {
    /// As configured.
    pub config: CronConfig,
    /// Parsed schedule.
    pub schedule: croner::Cron,
    /// Its time zone.
    pub tz: chrono_tz::Tz,
    /// The body to publish.
    pub body: Bytes,
}

impl CronSpec {
    /// Validates an entry; errors are `(sub-key, message)`.
    pub fn compile(c: &CronConfig) -> Result<Arc<Self>, (String, String)> {
        let fields = c.schedule.split_whitespace().count();
        if !(5..=6).contains(&fields) {
            return Err((
                "schedule".into(),
                format!("`{}` needs 5 or 6 fields", c.schedule),
            ));
        }
        let schedule: croner::Cron = c
            .schedule
            .parse()
            .map_err(|e| ("schedule".to_owned(), format!("`{}`: {e}", c.schedule)))?;
        let tz = match &c.timezone {
            None => chrono_tz::UTC,
            Some(t) => t.parse().map_err(|_| {
                (
                    "timezone".to_owned(),
                    format!("`{t}` is not an IANA time zone"),
                )
            })?,
        };
        Ok(Arc::new(CronSpec {
            config: c.clone(),
            schedule,
            tz,
            body: Bytes::from(c.body.clone()),
        }))
    }

    /// The next tick strictly after `after`.
    pub fn next_after(
        &self,
        after: chrono::DateTime<chrono::Utc>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        let local = after.with_timezone(&self.tz);
        self.schedule
            .find_next_occurrence(&local, false)
            .ok()
            .map(|t| t.with_timezone(&chrono::Utc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn cron_next_ticks_in_a_time_zone() {
        let c = |schedule: &str, tz: Option<&str>| CronConfig {
            name: "c".into(),
            queue: "q".into(),
            schedule: schedule.into(),
            timezone: tz.map(Into::into),
            body: String::new(),
            headers: Default::default(),
        };
        let every_second = CronSpec::compile(&c("* * * * * *", None)).unwrap();
        let t = chrono::Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        assert_eq!(
            every_second.next_after(t),
            Some(t + chrono::Duration::seconds(1))
        );
        let nine_in_paris = CronSpec::compile(&c("0 9 * * *", Some("Europe/Paris"))).unwrap();
        assert_eq!(
            nine_in_paris.next_after(t),
            Some(chrono::Utc.with_ymd_and_hms(2026, 1, 1, 8, 0, 0).unwrap())
        );
        assert_eq!(
            CronSpec::compile(&c("* * *", None)).unwrap_err().0,
            "schedule"
        );
        assert_eq!(
            CronSpec::compile(&c("61 * * * *", None)).unwrap_err().0,
            "schedule"
        );
        assert_eq!(
            CronSpec::compile(&c("* * * * *", Some("Mars/Base")))
                .unwrap_err()
                .0,
            "timezone"
        );
    }
}
