//! A parser of Prometheus text exposition: what `/dashboard` reads from the app's own
//! `/metrics` text once a second, and histogram quantiles computed the way Prometheus's
//! `histogram_quantile` does.

use std::collections::HashMap;

/// One sample's labels, as `(name, value)` pairs in exposition order.
type Labels = Vec<(String, String)>;

/// A parsed Prometheus text exposition: every sample by name and labels.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reading {
    samples: HashMap<String, Vec<(Labels, f64)>>,
}

impl Reading {
    /// Parses exposition text; lines it cannot read are skipped.
    pub fn parse(text: &str) -> Self {
        let mut samples: HashMap<String, Vec<(Labels, f64)>> = HashMap::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (series, value) = match line.rsplit_once(' ') {
                Some((series, value)) => (series.trim_end(), value),
                None => continue,
            };
            let Ok(value) = value.parse::<f64>() else { continue };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}').unwrap_or(rest))),
                None => (series, Vec::new()),
            };
            samples.entry(name.to_owned()).or_default().push((labels, value));
        }
        Self { samples }
    }

    /// The value of the unlabelled series `name`, or the sum over its labels; 0 if absent.
    pub fn value(&self, name: &str) -> f64 {
        self.samples.get(name).map_or(0.0, |series| series.iter().map(|(_, v)| v).sum())
    }

    /// The value of `name` with `label="value"`; 0 if absent.
    pub fn labelled(&self, name: &str, label: &str, value: &str) -> f64 {
        self.samples.get(name).map_or(0.0, |series| {
            series
                .iter()
                .filter(|(labels, _)| labels.iter().any(|(k, v)| k == label && v == value))
                .map(|(_, v)| v)
                .sum()
        })
    }

    /// The cumulative buckets of histogram `name` (summed over other labels), by bound.
    pub fn buckets(&self, name: &str) -> Buckets {
        let mut bounds: Vec<(f64, f64)> = Vec::new();
        for (labels, count) in self.samples.get(&format!("{name}_bucket")).into_iter().flatten() {
            let Some(le) = labels.iter().find(|(k, _)| k == "le").and_then(|(_, v)| parse_bound(v)) else {
                continue;
            };
            match bounds.iter_mut().find(|(bound, _)| *bound == le) {
                Some((_, total)) => *total += count,
                None => bounds.push((le, *count)),
            }
        }
        bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
        Buckets(bounds)
    }
}

fn parse_bound(text: &str) -> Option<f64> {
    match text {
        "+Inf" => Some(f64::INFINITY),
        other => other.parse().ok(),
    }
}

/// `k="v",k2="v2"` into pairs, undoing `\"`, `\\` and `\n`.
fn parse_labels(text: &str) -> Labels {
    let mut labels = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        let key: String = chars
            .by_ref()
            .take_while(|c| *c != '=')
            .collect::<String>()
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_owned();
        if key.is_empty() || chars.next() != Some('"') {
            return labels;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => break,
                },
                '"' => break,
                other => value.push(other),
            }
        }
        labels.push((key, value));
    }
}

/// A histogram's cumulative bucket counts, by upper bound (the last is `+Inf`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Buckets(Vec<(f64, f64)>);

impl Buckets {
    /// Observations counted.
    pub fn count(&self) -> f64 {
        self.0.last().map_or(0.0, |(_, count)| *count)
    }

    /// The observations since `earlier` (a reading of the same histogram).
    pub fn since(&self, earlier: &Buckets) -> Buckets {
        Buckets(
            self.0
                .iter()
                .map(|(bound, count)| {
                    let before = earlier.0.iter().find(|(b, _)| b == bound).map_or(0.0, |(_, c)| *c);
                    (*bound, (count - before).max(0.0))
                })
                .collect(),
        )
    }

    /// The `q` quantile, interpolated within its bucket as Prometheus's `histogram_quantile`
    /// does (the highest finite bound if it falls in `+Inf`); 0 when empty.
    pub fn quantile(&self, q: f64) -> f64 {
        let total = self.count();
        if total <= 0.0 {
            return 0.0;
        }
        let rank = q.clamp(0.0, 1.0) * total;
        let (mut lower, mut below) = (0.0, 0.0);
        for (bound, count) in &self.0 {
            if *count >= rank {
                if bound.is_infinite() {
                    return lower;
                }
                let inside = count - below;
                return if inside > 0.0 { lower + (bound - lower) * (rank - below) / inside } else { *bound };
            }
            (lower, below) = (*bound, *count);
        }
        lower
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_a_bucket_like_prometheus() {
        let buckets = Buckets(vec![(0.001, 0.0), (0.002, 50.0), (0.004, 100.0), (f64::INFINITY, 100.0)]);
        assert!((buckets.quantile(0.5) - 0.002).abs() < 1e-12);
        assert!((buckets.quantile(0.75) - 0.003).abs() < 1e-12);
        assert!((buckets.quantile(0.25) - 0.0015).abs() < 1e-12);
        let overflow = Buckets(vec![(0.001, 1.0), (f64::INFINITY, 10.0)]);
        assert_eq!(overflow.quantile(0.99), 0.001, "the +Inf bucket answers the highest finite bound");
        assert_eq!(Buckets::default().quantile(0.5), 0.0);
        let later = Buckets(vec![(0.001, 5.0), (0.002, 60.0), (0.004, 120.0), (f64::INFINITY, 120.0)]);
        assert_eq!(later.since(&buckets).count(), 20.0);
    }

    #[test]
    fn labels_with_escapes_parse() {
        let reading = Reading::parse(
            "# HELP x y\nx{a=\"1\",b=\"q\\\"uote\"} 2\nx{a=\"2\"} 3\ny 1.5\nbroken line here\nz{le=\"+Inf\"} 4\n",
        );
        assert_eq!(reading.value("x"), 5.0);
        assert_eq!(reading.labelled("x", "b", "q\"uote"), 2.0);
        assert_eq!(reading.value("y"), 1.5);
        assert_eq!(reading.value("broken"), 0.0);
    }
}
