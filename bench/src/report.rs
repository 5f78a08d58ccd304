//! Collected numbers: per-round values for each metric and target, their
//! medians, the printed table and the JSON file.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::stats::median;

/// Which way a metric improves, for the ratio column.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Higher,
    Lower,
}

#[derive(Debug, Serialize)]
pub struct Value {
    pub median: f64,
    pub rounds: Vec<f64>,
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub scenario: &'static str,
    pub metric: String,
    pub unit: &'static str,
    pub better: Better,
    pub values: BTreeMap<String, Value>,
}

/// One of the targets, checked against this run's numbers.
#[derive(Debug, Serialize)]
pub struct Check {
    pub target: String,
    pub burrow: f64,
    pub limit: f64,
    /// Where the limit comes from: this run's peer column or the issue's
    /// reference numbers.
    pub basis: String,
    pub met: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub columns: Vec<String>,
    pub rows: Vec<Row>,
    pub checks: Vec<Check>,
    pub notes: Vec<String>,
}

impl Report {
    /// Records one round's value.
    pub fn push(
        &mut self,
        scenario: &'static str,
        metric: &str,
        unit: &'static str,
        better: Better,
        target: &str,
        value: f64,
    ) {
        let i = match self
            .rows
            .iter()
            .position(|r| r.scenario == scenario && r.metric == metric)
        {
            Some(i) => i,
            None => {
                self.rows.push(Row {
                    scenario,
                    metric: metric.to_owned(),
                    unit,
                    better,
                    values: BTreeMap::new(),
                });
                self.rows.len() - 1
            }
        };
        let v = self.rows[i]
            .values
            .entry(target.to_owned())
            .or_insert(Value {
                median: f64::NAN,
                rounds: Vec::new(),
            });
        v.rounds.push(value);
        v.median = median(&v.rounds);
    }

    pub fn get(&self, scenario: &str, metric: &str, target: &str) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| r.scenario == scenario && r.metric == metric)?
            .values
            .get(target)
            .map(|v| v.median)
            .filter(|m| m.is_finite())
    }

    pub fn note(&mut self, note: impl Into<String>) {
        let note = note.into();
        eprintln!("note: {note}");
        self.notes.push(note);
    }

    pub fn table(&self) -> String {
        let peer = self.columns.iter().any(|c| c == crate::PEER);
        let mut header: Vec<String> = vec!["scenario".into(), "metric".into(), "unit".into()];
        header.extend(self.columns.iter().cloned());
        if peer {
            header.push("burrow advantage".into());
        }
        let mut lines: Vec<Vec<String>> = vec![header];
        for r in &self.rows {
            let mut line = vec![r.scenario.to_owned(), r.metric.clone(), r.unit.to_owned()];
            for c in &self.columns {
                line.push(
                    r.values
                        .get(c)
                        .map_or_else(|| "-".to_owned(), |v| fmt_num(v.median)),
                );
            }
            if peer {
                let b = r.values.get(crate::BURROW).map(|v| v.median);
                let p = r.values.get(crate::PEER).map(|v| v.median);
                line.push(match (b, p) {
                    (Some(b), Some(p)) if b.is_finite() && p.is_finite() && b > 0.0 && p > 0.0 => {
                        // Above 1x burrow is better, whichever way the metric improves.
                        match r.better {
                            Better::Higher => format!("{:.2}x", b / p),
                            Better::Lower => format!("{:.2}x", p / b),
                        }
                    }
                    _ => "-".to_owned(),
                });
            }
            lines.push(line);
        }
        let widths: Vec<usize> = (0..lines[0].len())
            .map(|i| {
                lines
                    .iter()
                    .map(|l| l[i].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for (n, l) in lines.iter().enumerate() {
            let cells: Vec<String> = l
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    if i < 3 {
                        format!("{c:<w$}", w = widths[i])
                    } else {
                        format!("{c:>w$}", w = widths[i])
                    }
                })
                .collect();
            let _ = writeln!(out, "{}", cells.join("  ").trim_end());
            if n == 0 {
                let total = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
                let _ = writeln!(out, "{}", "-".repeat(total));
            }
        }
        if !self.checks.is_empty() {
            let _ = writeln!(out, "\ntargets (issue 8):");
            for c in &self.checks {
                let _ = writeln!(
                    out,
                    "  [{}] {}: burrow {} vs limit {} ({})",
                    if c.met { "met" } else { "MISSED" },
                    c.target,
                    fmt_num(c.burrow),
                    fmt_num(c.limit),
                    c.basis
                );
            }
        }
        if !self.notes.is_empty() {
            let _ = writeln!(out, "\nnotes:");
            for n in &self.notes {
                let _ = writeln!(out, "  - {n}");
            }
        }
        out
    }
}

/// Three significant digits or so, without scientific notation.
pub fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        return "-".into();
    }
    let a = x.abs();
    if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_follow_pushed_rounds() {
        let mut r = Report::default();
        for v in [3.0, 1.0, 2.0] {
            r.push("bulk", "download", "MB/s", Better::Higher, "burrow", v);
        }
        r.push("bulk", "download", "MB/s", Better::Higher, "direct", 9.0);
        assert_eq!(r.rows.len(), 1);
        assert_eq!(r.get("bulk", "download", "burrow"), Some(2.0));
        assert_eq!(r.get("bulk", "download", "direct"), Some(9.0));
        assert_eq!(r.get("bulk", "upload", "direct"), None);
    }

    #[test]
    fn numbers_keep_about_three_digits() {
        assert_eq!(fmt_num(1234.5), "1234");
        assert_eq!(fmt_num(12.34), "12.3");
        assert_eq!(fmt_num(1.234), "1.23");
        assert_eq!(fmt_num(0.01234), "0.012");
        assert_eq!(fmt_num(f64::NAN), "-");
    }
}
