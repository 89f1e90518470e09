//! From the instances the planner measures to the configured sizes: which instances
//! to run, and the lines (in layers, in queries per class, in tasks) and the segment
//! model (with gradient checkpointing) through their measurements.

use crate::config::{CheckpointPlan, Config};
use crate::Result;

use super::measure::{Instance, Measured};

/// An instance's place on the layer axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LayerPoint {
    /// The configured model (at most 2 layers, or not a transformer).
    Configured,
    /// One layer (one segment, with checkpointing).
    One,
    /// Two layers (a segment each, with checkpointing).
    Two,
    /// Two layers in one segment (with checkpointing).
    TwoInOneSegment,
    /// Four layers in two segments of two (with checkpointing).
    FourInTwoSegments,
}

/// An instance's place on the three axes: its layers, its queries per class (the
/// index into [`Target::query_points`]) and its tasks (the index into
/// [`Target::task_points`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Corner {
    layer: LayerPoint,
    query: usize,
    task: usize,
}

/// The configured sizes the measurements are extrapolated to.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Target {
    /// Layers of the model, when extrapolated: more than two (without
    /// checkpointing), more than two segments (checkpointing every n layers), more
    /// than four (checkpointing chosen layers).
    layers: Option<usize>,
    /// Layers per step of the layer axis: n when checkpointing every n layers, 1
    /// otherwise.
    stride: usize,
    /// Steps of the layer axis in the smaller instance (the larger has one more):
    /// 2 when checkpointing every n layers (a stack of one segment is also its last,
    /// which runs with the head's graph), 1 otherwise.
    first: usize,
    /// With checkpointing of chosen layers: the number of stored segment
    /// boundaries and the most layers one segment recomputes.
    segments: Option<(usize, usize)>,
    /// Queries per class, when extrapolated, and the smaller of the two numbers
    /// measured (see [`Target::query_points`]).
    queries: Option<(usize, usize)>,
    /// Tasks per meta-batch.
    tasks: usize,
}

/// Segment boundaries and longest segment of a checkpointing plan over `layers`
/// layers: segment 0 is the embedding and layers `0..B₀`, segment k layers
/// `B_{k−1}..B_k`, the last `B_{n−1}..L` (see `engine::Checkpointed`).
fn segment_shape(boundaries: &[usize], layers: usize) -> (usize, usize) {
    let mut longest = boundaries.first().copied().unwrap_or(layers);
    for pair in boundaries.windows(2) {
        longest = longest.max(pair[1] - pair[0]);
    }
    if let Some(last) = boundaries.last() {
        longest = longest.max(layers - last);
    }
    (boundaries.len(), longest)
}

impl Target {
    /// The sizes of `config` with a transformer of `layers` layers (`None`: a dense
    /// model) and `tasks` tasks per meta-batch; `images`: whether its tasks are
    /// images (whose queries per class are extrapolated).
    pub(crate) fn of(
        config: &Config,
        layers: Option<usize>,
        tasks: usize,
        images: bool,
    ) -> Result<Self> {
        let plan = config.memory_optimization.checkpointing.plan();
        // Every n layers, the stack is whole segments of n: the peak is affine in
        // their number, measured with one and two. Chosen layers cut it unevenly.
        let (stride, first, measured_up_to) = match &plan {
            Some(CheckpointPlan::Every(n)) => ((*n).max(1), 2, 3 * (*n).max(1)),
            Some(CheckpointPlan::Layers(_)) => (1, 1, 4),
            None => (1, 1, 2),
        };
        let layers = layers.filter(|&l| l > measured_up_to);
        let segments = match (layers, &plan) {
            (Some(l), Some(plan @ CheckpointPlan::Layers(_))) => {
                Some(segment_shape(&plan.boundaries(l)?, l))
            }
            _ => None,
        };
        // See `query_points`.
        let shots = config.data.k_shot.max(1);
        let first_query = if plan.is_some() {
            2 * shots
        } else {
            shots.max(3)
        };
        let queries = config.data.n_query;
        let queries = (images && queries > first_query + 1).then_some((queries, first_query));
        Ok(Target {
            layers,
            stride,
            first,
            segments,
            queries,
            tasks,
        })
    }

    /// Queries per class of the instances when extrapolated, q₀ and q₀ + 1: k and
    /// k + 1 for k shots (at least 3 and 4), 2k and 2k + 1 with checkpointing; the
    /// configured number (`None`) otherwise.
    ///
    /// A task's peak is the larger of what its support set's passes and its query
    /// set's passes hold: the metric learners pull the support embeddings back
    /// while the query's wait, then the query's; MAML adapts on the support, then
    /// differentiates the query loss. Each is affine in the queries; past the
    /// point where the query's passes make the peak, so is the peak, and the line
    /// through two numbers past it holds for every larger one, where the line
    /// through 1 and 2 followed the support's passes and fell short (by 2.7× on a
    /// checkpointed Conv4 FS-CT task, 5-way 5-shot 16-query).
    ///
    /// With the whole graph, what waits of the query during the support's
    /// backward pass is its whole graph, and the query's own backward pass adds its
    /// temporaries to it: where those are small beside the graph, the support's
    /// phase keeps the peak for a few queries per class more than k. Measured:
    /// ProtoNets on Omniglot 20-way 1-shot (Conv4, 28 px) peak at 172, 217, 262,
    /// 327, 393, 459 and 592 MiB with 1, 2, 3, 4, 5, 6 and 8 queries per class, 45
    /// MiB a query up to 3 and 66 from 3 on (the line through 1 and 2 fell 10.5%
    /// short at 5, 17.9% at 8); Conv4 and ResNet-34 FS-CT tasks of 5 shots were
    /// past the turn at 5. So q₀ is at least 3. With
    /// checkpointing what waits is the query's stored segment inputs and its last
    /// segment's graph (b + g_last an image), while the query's own sweep holds
    /// b + g_max: it makes the peak from q·(g_max − g_last) ≥ k·g_max on, at most
    /// 2k when the last segment's graph is at most half the largest, as a
    /// backbone's last stage, at a few pixels, is beside its first (from k and
    /// k + 1 a checkpointed ResNet-34 at 84 px was predicted 21% under).
    ///
    /// The instances keep a fraction of the configured task's images: a ResNet-34
    /// at 224×224 with 16 queries per class, which this plans, need not fit where
    /// it is planned.
    fn query_points(&self) -> Vec<Option<usize>> {
        match self.queries {
            Some((_, first)) => vec![Some(first), Some(first + 1)],
            None => vec![None],
        }
    }

    /// The smaller of the two query numbers measured, when queries are
    /// extrapolated.
    pub(crate) fn first_query(&self) -> Option<usize> {
        self.queries.map(|(_, first)| first)
    }

    /// Measures from `first` and `first + 1` queries per class instead; from the
    /// configured number (no extrapolation) when that is not below it.
    pub(crate) fn set_first_query(&mut self, first: usize) {
        self.queries = self
            .queries
            .and_then(|(queries, _)| (queries > first + 1).then_some((queries, first)));
    }

    /// Where the line through `first` and `first + 1` queries is checked before it
    /// is trusted (see [`super::plan_with`]): half as many queries again, at least
    /// two more; `None` where that is not below the configured number.
    pub(crate) fn query_check_point(&self) -> Option<usize> {
        let (queries, first) = self.queries?;
        let check = first + first.div_ceil(2).max(2);
        (check < queries).then_some(check)
    }

    /// Tasks of the instances: 1 and 2 for a larger meta-batch (extrapolated), the
    /// configured number otherwise.
    fn task_points(&self) -> Vec<usize> {
        if self.tasks > 2 {
            vec![1, 2]
        } else {
            vec![self.tasks]
        }
    }

    fn layer_points(&self) -> Vec<LayerPoint> {
        match (self.layers, self.segments) {
            (None, _) => vec![LayerPoint::Configured],
            (Some(_), None) => vec![LayerPoint::One, LayerPoint::Two],
            (Some(_), Some(_)) => vec![
                LayerPoint::One,
                LayerPoint::Two,
                LayerPoint::TwoInOneSegment,
                LayerPoint::FourInTwoSegments,
            ],
        }
    }

    /// The measurements carried to the configured sizes.
    pub(crate) fn extrapolate(&self, measured: &[(Corner, Measured)]) -> Measured {
        let per_task: Vec<Measured> = (0..self.task_points().len())
            .map(|task| {
                let per_query: Vec<Measured> = (0..self.query_points().len())
                    .map(|query| self.along_layers(measured, query, task))
                    .collect();
                match (per_query.as_slice(), self.queries) {
                    // The line through `first` (at 1) and `first + 1` (at 2).
                    ([one, two], Some((queries, first))) => {
                        along(one, two, (queries + 1 - first) as f64)
                    }
                    ([only], _) => *only,
                    _ => unreachable!("one or two query points"),
                }
            })
            .collect();
        match per_task.as_slice() {
            [one, two] => along(one, two, self.tasks as f64),
            [only] => *only,
            _ => unreachable!("one or two task points"),
        }
    }

    /// The measurements at `query` and `task` carried to the configured layers.
    fn along_layers(&self, measured: &[(Corner, Measured)], query: usize, task: usize) -> Measured {
        let at = |layer: LayerPoint, task: usize| -> Measured {
            measured
                .iter()
                .find(|(c, _)| *c == Corner { layer, query, task })
                .map(|(_, m)| *m)
                .expect("every corner is measured")
        };
        match self.layers {
            None => at(LayerPoint::Configured, task),
            Some(layers) => {
                let (one, two) = (at(LayerPoint::One, task), at(LayerPoint::Two, task));
                // Steps of the axis past the smaller instance's, plus one.
                let x = layers as f64 / self.stride as f64 - self.first as f64 + 1.0;
                let mut line = along(&one, &two, x);
                if let Some((boundaries, longest)) = self.segments {
                    let points = [
                        one.peak,
                        two.peak,
                        at(LayerPoint::TwoInOneSegment, task).peak,
                        at(LayerPoint::FourInTwoSegments, task).peak,
                    ];
                    line.peak = segment_peak(points, layers, boundaries, longest);
                }
                line
            }
        }
    }
}

/// The instances to measure, the smallest first.
pub(crate) fn instances_of(target: &Target) -> Vec<(Corner, Instance)> {
    let mut instances = Vec::new();
    for (task, &tasks) in target.task_points().iter().enumerate() {
        for (query, &n_query) in target.query_points().iter().enumerate() {
            for layer in target.layer_points() {
                let (stride, first) = (target.stride, target.first);
                let (layers, checkpoint) = match layer {
                    LayerPoint::Configured => (None, None),
                    LayerPoint::One => (Some(first * stride), Some(vec![0])),
                    LayerPoint::Two => (Some((first + 1) * stride), Some(vec![0, 1])),
                    LayerPoint::TwoInOneSegment => (Some(2), Some(vec![0])),
                    LayerPoint::FourInTwoSegments => (Some(4), Some(vec![0, 2])),
                };
                instances.push((
                    Corner { layer, query, task },
                    Instance {
                        layers,
                        tasks,
                        n_query,
                        checkpoint: checkpoint.filter(|_| target.segments.is_some()),
                    },
                ));
            }
        }
    }
    instances
}

/// The line through `one` (at 1) and `two` (at 2), at `x`, for every figure.
fn along(one: &Measured, two: &Measured, x: f64) -> Measured {
    let x = x - 1.0;
    let line = |a: f64, b: f64| a + x * (b - a);
    Measured {
        weights: line(one.weights, two.weights),
        build_peak: line(one.build_peak, two.build_peak),
        trainable: line(one.trainable, two.trainable),
        data: line(one.data, two.data),
        optimizer: line(one.optimizer, two.optimizer),
        peak: line(one.peak, two.peak),
        forward_graph: line(one.forward_graph, two.forward_graph),
        backward_extra: line(one.backward_extra, two.backward_extra),
        gradient_graph: line(one.gradient_graph, two.gradient_graph),
    }
}

/// The checkpointed peak `c + u·L + b·S + g·M` of `layers` layers in segments
/// with `boundaries` stored boundaries and at most `longest` layers each, from the
/// peaks of one layer (L = S = M = 1), two layers in two segments (S = 2, M = 1),
/// two in one (S = 1, M = 2) and four in two of two (S = 2, M = 2). `u` is what
/// every layer costs whatever the segments (its weights, parameters and their
/// state; with full-graph MAML, whose inner steps are not segmented, its share of
/// every inner graph), `b` a stored boundary, `g` a layer of the segment being
/// recomputed.
fn segment_peak(points: [f64; 4], layers: usize, boundaries: usize, longest: usize) -> f64 {
    let [one, two, joined, four] = points;
    let per_layer = (four - joined) - (two - one);
    let per_boundary = (two - one) - per_layer;
    let per_segment_layer = (joined - one) - per_layer;
    let constant = one - per_layer - per_boundary - per_segment_layer;
    constant
        + per_layer * layers as f64
        + per_boundary * boundaries as f64
        + per_segment_layer * longest as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(peak: f64, weights: f64) -> Measured {
        Measured {
            peak,
            weights,
            ..Measured::default()
        }
    }

    #[test]
    fn segments_are_counted_as_the_engine_cuts_them() {
        assert_eq!(segment_shape(&[0, 1, 2, 3, 4, 5], 6), (6, 1));
        assert_eq!(segment_shape(&[0, 2, 4], 6), (3, 2));
        assert_eq!(segment_shape(&[1, 3], 6), (2, 3));
        assert_eq!(segment_shape(&[0], 6), (1, 6));
    }

    /// A peak that really is `c + u·L + b·S + g·M` is recovered exactly from the
    /// four instances, for any plan; lines in layers and tasks likewise.
    #[test]
    fn the_segment_model_and_the_lines_recover_what_they_assume() {
        for (c, u, b, g) in [(1000.0, 300.0, 20.0, 50.0), (500.0, 80.0, 0.0, 0.0)] {
            let truth = |l: f64, s: f64, m: f64| c + u * l + b * s + g * m;
            let points = [
                truth(1.0, 1.0, 1.0),
                truth(2.0, 2.0, 1.0),
                truth(2.0, 1.0, 2.0),
                truth(4.0, 2.0, 2.0),
            ];
            for (boundaries, layers) in [(vec![0, 2, 4], 6), (vec![1, 3], 12), (vec![0], 5)] {
                let (s, m) = segment_shape(&boundaries, layers);
                let predicted = segment_peak(points, layers, s, m);
                assert!((predicted - truth(layers as f64, s as f64, m as f64)).abs() < 1e-6);
            }
        }
        let line = along(&measured(10.0, 1.0), &measured(13.0, 2.0), 6.0);
        assert_eq!((line.peak, line.weights), (25.0, 6.0));
    }

    /// Image tasks of more queries per class than one more than the shots are
    /// measured with as many as the shots (at least 3) and one more (with each task
    /// point), and a
    /// peak affine in queries and tasks is recovered.
    #[test]
    fn queries_per_class_are_extrapolated_on_images() {
        let mut config = Config::default();
        config.data.k_shot = 1;
        config.data.n_query = 16;
        let text = Target::of(&config, None, 4, false).unwrap();
        assert_eq!(instances_of(&text).len(), 2);
        let target = Target::of(&config, None, 4, true).unwrap();
        let instances = instances_of(&target);
        let points: Vec<_> = instances
            .iter()
            .map(|(_, i)| (i.tasks, i.n_query))
            .collect();
        assert_eq!(
            points,
            [(1, Some(3)), (1, Some(4)), (2, Some(3)), (2, Some(4))]
        );
        let truth = |tasks: f64, queries: f64| 100.0 + 30.0 * tasks + 7.0 * queries;
        let points: Vec<_> = instances
            .iter()
            .map(|(corner, i)| {
                let peak = truth(i.tasks as f64, i.n_query.unwrap() as f64);
                (*corner, measured(peak, 1.0))
            })
            .collect();
        assert!((target.extrapolate(&points).peak - truth(4.0, 16.0)).abs() < 1e-9);
        config.data.k_shot = 5;
        let target = Target::of(&config, None, 1, true).unwrap();
        let points: Vec<_> = instances_of(&target)
            .iter()
            .map(|(_, i)| i.n_query)
            .collect();
        assert_eq!(points, [Some(5), Some(6)]);
        let points: Vec<_> = instances_of(&target)
            .iter()
            .map(|(corner, i)| {
                (
                    *corner,
                    measured(truth(1.0, i.n_query.unwrap() as f64), 1.0),
                )
            })
            .collect();
        assert!((target.extrapolate(&points).peak - truth(1.0, 16.0)).abs() < 1e-9);
        config.data.n_query = 6;
        let target = Target::of(&config, None, 1, true).unwrap();
        assert_eq!(instances_of(&target)[0].1.n_query, None);
        // Checkpointed: 2k and 2k + 1.
        config.memory_optimization.checkpointing.enabled = true;
        config.data.n_query = 16;
        let target = Target::of(&config, None, 1, true).unwrap();
        let points: Vec<_> = instances_of(&target)
            .iter()
            .map(|(_, i)| i.n_query)
            .collect();
        assert_eq!(points, [Some(10), Some(11)]);
        config.data.n_query = 11;
        let target = Target::of(&config, None, 1, true).unwrap();
        assert_eq!(instances_of(&target)[0].1.n_query, None);
    }

    /// The first query number moves on, and stops extrapolating where the pair
    /// would reach the configured number.
    #[test]
    fn the_first_query_number_moves_on_to_the_configured_one() {
        let mut config = Config::default();
        config.data.k_shot = 1;
        config.data.n_query = 15;
        let mut target = Target::of(&config, None, 1, true).unwrap();
        assert_eq!(target.first_query(), Some(3));
        assert_eq!(target.query_check_point(), Some(5));
        target.set_first_query(5);
        assert_eq!(target.query_check_point(), Some(8));
        target.set_first_query(8);
        assert_eq!(target.query_check_point(), Some(12));
        target.set_first_query(12);
        assert_eq!(target.query_check_point(), None);
        target.set_first_query(14);
        assert_eq!(target.first_query(), None);
        assert_eq!(instances_of(&target)[0].1.n_query, None);
    }

    #[test]
    fn small_configurations_are_measured_as_they_are() {
        let config = Config::default();
        let target = Target::of(&config, Some(2), 2, false).unwrap();
        let instances = instances_of(&target);
        assert_eq!(instances.len(), 1);
        assert_eq!(instances[0].1.layers, None);
        let mut checkpointed = Config::default();
        checkpointed.memory_optimization.checkpointing.enabled = true;
        // Every layer: two and three segments of one layer, the configured plan kept.
        let target = Target::of(&checkpointed, Some(6), 4, false).unwrap();
        let instances = instances_of(&target);
        assert_eq!(instances.len(), 4);
        assert_eq!(instances[0].1.layers, Some(2));
        assert_eq!(instances[0].1.tasks, 1);
        assert!(instances.iter().all(|(_, i)| i.checkpoint.is_none()));
        // Every 2 layers of 8: 4 and 6 layers; every 2 of 6: as configured.
        checkpointed.memory_optimization.checkpointing.every = 2;
        let target = Target::of(&checkpointed, Some(8), 2, false).unwrap();
        let layers: Vec<_> = instances_of(&target)
            .iter()
            .map(|(_, i)| i.layers)
            .collect();
        assert_eq!(layers, [Some(4), Some(6)]);
        assert_eq!(
            instances_of(&Target::of(&checkpointed, Some(6), 2, false).unwrap()).len(),
            1
        );
        // Chosen layers: the four instances of the segment model.
        checkpointed.memory_optimization.checkpointing.layers = Some(vec![1, 3]);
        let target = Target::of(&checkpointed, Some(6), 4, false).unwrap();
        let instances = instances_of(&target);
        assert_eq!(instances.len(), 8);
        assert!(instances.iter().all(|(_, i)| i.checkpoint.is_some()));
    }
}
