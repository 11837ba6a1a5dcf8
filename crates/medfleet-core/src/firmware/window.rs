//! Maintenance windows: when a rollout may install, in the site's local time (the caller converts with the site's
//! timezone, so this stays free of clocks and tz data). `Mon-Fri 02:00-05:00`; a window may cross midnight
//! (`Sat 22:00-04:00` runs into Sunday morning), and its days name the day it opens.

use chrono::{Datelike as _, NaiveDateTime, NaiveTime, Timelike as _, Weekday};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a maintenance window: write days and hours, e.g. 'Mon-Fri 02:00-05:00' or 'Sat,Sun 22:00-04:00'")]
pub struct WindowError(String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Bit `n` set: the window opens on weekday `n` (Monday = 0).
    days: u8,
    opens: NaiveTime,
    closes: NaiveTime,
}

fn weekday(text: &str) -> Option<Weekday> {
    Some(match text {
        "Mon" => Weekday::Mon,
        "Tue" => Weekday::Tue,
        "Wed" => Weekday::Wed,
        "Thu" => Weekday::Thu,
        "Fri" => Weekday::Fri,
        "Sat" => Weekday::Sat,
        "Sun" => Weekday::Sun,
        _ => return None,
    })
}

impl Window {
    pub fn parse(text: &str) -> Result<Self, WindowError> {
        let bad = || WindowError(text.chars().take(40).collect());
        let (days_text, hours) = text.trim().split_once(' ').ok_or_else(bad)?;
        let mut days = 0u8;
        for part in days_text.split(',') {
            let (from, to) = part.split_once('-').unwrap_or((part, part));
            let (from, to) = (weekday(from).ok_or_else(bad)?, weekday(to).ok_or_else(bad)?);
            let mut day = from;
            // Mon-Fri, or a range through the week's end such as Fri-Mon.
            loop {
                days |= 1 << day.num_days_from_monday();
                if day == to {
                    break;
                }
                day = day.succ();
            }
        }
        let (opens, closes) = hours.trim().split_once('-').ok_or_else(bad)?;
        let time = |t: &str| NaiveTime::parse_from_str(t.trim(), "%H:%M").map_err(|_| bad());
        let (opens, closes) = (time(opens)?, time(closes)?);
        if opens == closes {
            return Err(bad());
        }
        Ok(Self { days, opens, closes })
    }

    fn opens_on(&self, day: Weekday) -> bool {
        self.days & (1 << day.num_days_from_monday()) != 0
    }

    /// Whether `local` (the site's wall-clock time) is inside the window.
    pub fn contains(&self, local: NaiveDateTime) -> bool {
        let time = local
            .time()
            .with_second(0)
            .and_then(|t| t.with_nanosecond(0))
            .unwrap_or(local.time());
        let day = local.weekday();
        if self.opens < self.closes {
            self.opens_on(day) && time >= self.opens && time < self.closes
        } else {
            // Crosses midnight: the evening part belongs to today, the early-morning part to yesterday's window.
            (self.opens_on(day) && time >= self.opens) || (self.opens_on(day.pred()) && time < self.closes)
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::NaiveDate;
    use proptest::prelude::*;

    use super::*;

    fn at(y: i32, m: u32, d: u32, h: u32, min: u32) -> NaiveDateTime {
        NaiveDate::from_ymd_opt(y, m, d)
            .unwrap()
            .and_hms_opt(h, min, 0)
            .unwrap()
    }

    #[test]
    fn weekday_nights() {
        let w = Window::parse("Mon-Fri 02:00-05:00").unwrap();
        // 2026-12-07 is a Monday.
        assert!(w.contains(at(2026, 12, 7, 2, 0)));
        assert!(w.contains(at(2026, 12, 7, 4, 59)));
        assert!(!w.contains(at(2026, 12, 7, 5, 0)));
        assert!(!w.contains(at(2026, 12, 7, 1, 59)));
        assert!(!w.contains(at(2026, 12, 12, 3, 0)), "Saturday");
    }

    #[test]
    fn a_window_may_cross_midnight() {
        let w = Window::parse("Sat 22:00-04:00").unwrap();
        assert!(w.contains(at(2026, 12, 12, 23, 0)), "Saturday evening");
        assert!(
            w.contains(at(2026, 12, 13, 3, 0)),
            "Sunday early morning belongs to Saturday's window"
        );
        assert!(!w.contains(at(2026, 12, 13, 23, 0)), "Sunday evening");
        assert!(
            !w.contains(at(2026, 12, 12, 3, 0)),
            "Saturday early morning belongs to Friday"
        );
    }

    #[test]
    fn ranges_wrap_through_the_weekend() {
        let w = Window::parse("Fri-Mon 01:00-02:00").unwrap();
        for day in [11, 12, 13, 14] {
            assert!(w.contains(at(2026, 12, day, 1, 30)), "{day}");
        }
        assert!(!w.contains(at(2026, 12, 15, 1, 30)), "Tuesday");
    }

    #[test]
    fn nonsense_is_refused() {
        for bad in [
            "",
            "Mon",
            "Mon 02:00",
            "Mon 02:00-02:00",
            "Funday 01:00-02:00",
            "Mon 25:00-26:00",
            "Mon-Fri 2-5",
        ] {
            assert!(Window::parse(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn every_day_all_night_contains_its_opening_minute(day in 0u32..7, h in 0u32..24, m in 0u32..60) {
            let w = Window::parse("Mon-Sun 00:00-23:59").unwrap();
            let local = at(2026, 12, 7 + day, h, m);
            prop_assert_eq!(w.contains(local), !(h == 23 && m == 59));
        }
    }
}
