//! Colour (or grey) photographs as few-shot vision reads them: decoded once into a
//! cache of small `u8` images, then, per batch, centre-cropped (evaluation) or
//! augmented (meta-training with `data.train_aug`) and normalised channel-wise.
//!
//! This follows the FS-CT reference project's transforms: evaluation resizes to
//! `⌊1.15·side⌋` and crops the centre `side × side`; training augmentation is a
//! random resized crop (area 8–100%, aspect ratio 3/4–4/3), a horizontal flip with
//! probability ½ and a colour jitter (brightness, contrast and saturation, each
//! by a factor in [0.6, 1.4], in random order), then the same normalisation.
//! The one difference: the random crop is taken from the cached `⌊1.15·side⌋`
//! image, not from the full-resolution file, so that a file is decoded once.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::readers::resize_area;
use crate::config::{DataConfig, ImageColor, ImageNormalization};
use crate::{Error, Result};

/// ImageNet's channel means and standard deviations (RGB), as torchvision and the
/// FS-CT reference normalise.
const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// The same statistics for grey images: the means of the three channels'.
const IMAGENET_GREY_MEAN: f32 = 0.449;
const IMAGENET_GREY_STD: f32 = 0.226;
/// Evaluation resizes to this multiple of the side, then crops the centre.
const EVAL_RESIZE: f64 = 1.15;
/// Colour jitter: each enhancement factor is 1 ± up to this.
const JITTER: f32 = 0.4;

/// How cached images become model inputs: the cache's size, the output size, the
/// normalisation and whether batches are augmented.
#[derive(Debug, Clone, PartialEq)]
pub struct PhotoTransform {
    /// Colour channels (3 RGB, 1 grey).
    pub channels: usize,
    /// Side of the cached images (`⌊1.15 · side⌋`).
    pub stored_side: usize,
    /// Side of the images the model reads.
    pub side: usize,
    /// Per-channel mean subtracted after scaling to [0, 1].
    pub mean: Vec<f32>,
    /// Per-channel standard deviation divided by.
    pub std: Vec<f32>,
    /// Random resized crop, flip and colour jitter instead of the centre crop.
    pub augment: bool,
}

impl PhotoTransform {
    /// The transform of a `data` section (augmentation off: a split turns it on).
    pub fn for_config(config: &DataConfig) -> Self {
        let channels = match config.color {
            ImageColor::Rgb => 3,
            ImageColor::Grey => 1,
        };
        let (mean, std) = match (config.normalization, channels) {
            (ImageNormalization::Imagenet, 3) => (IMAGENET_MEAN.to_vec(), IMAGENET_STD.to_vec()),
            (ImageNormalization::Imagenet, _) => {
                (vec![IMAGENET_GREY_MEAN], vec![IMAGENET_GREY_STD])
            }
            (ImageNormalization::None, c) => (vec![0.0; c], vec![1.0; c]),
        };
        let side = config.image_size;
        Self {
            channels,
            stored_side: ((side as f64 * EVAL_RESIZE) as usize).max(side),
            side,
            mean,
            std,
            augment: false,
        }
    }

    /// Bytes of one cached image.
    pub fn stored_bytes(&self) -> usize {
        self.channels * self.stored_side * self.stored_side
    }

    /// Decodes a JPEG or PNG file's `bytes` (any colour type; converted to this
    /// transform's channels) and resizes it to the cache's square side by area
    /// averaging (the aspect ratio is not kept, as torchvision's `Resize([s, s])`).
    /// `name` is used in errors.
    pub fn decode(&self, bytes: &[u8], name: &str) -> Result<Vec<u8>> {
        let image = image::load_from_memory(bytes).map_err(|e| Error::Format {
            path: name.into(),
            message: format!("not a readable JPEG or PNG image: {e}"),
        })?;
        let (width, height) = (image.width() as usize, image.height() as usize);
        let rgb = image.to_rgb8();
        let rgb: Vec<Vec<f32>> = (0..3)
            .map(|c| rgb.pixels().map(|p| f32::from(p.0[c]) / 255.0).collect())
            .collect();
        // Grey as PIL's `convert("L")` makes it (ITU-R 601-2 luma), which is what
        // the reference projects read.
        let planes = if self.channels == 3 {
            rgb
        } else {
            vec![luminance(&rgb)]
        };
        let mut stored = Vec::with_capacity(self.stored_bytes());
        for plane in &planes {
            let resized = resize_area(plane, width, height, self.stored_side);
            stored.extend(
                resized
                    .iter()
                    .map(|&v| (v * 255.0).round().clamp(0.0, 255.0) as u8),
            );
        }
        Ok(stored)
    }

    /// A cached image as the model reads it: augmented with `rng` when this
    /// transform augments, otherwise the centre crop; then normalised. Values
    /// `channels × side × side`, row-major.
    pub fn view(&self, stored: &[u8], rng: &mut ChaCha8Rng) -> Vec<f32> {
        let s = self.stored_side;
        let planes: Vec<Vec<f32>> = stored
            .chunks(s * s)
            .map(|p| p.iter().map(|&v| f32::from(v) / 255.0).collect())
            .collect();
        let mut planes = if self.augment {
            let (x, y, w, h) = random_resized_crop(s, rng);
            let flip = rng.random_bool(0.5);
            let mut out: Vec<Vec<f32>> = planes
                .iter()
                .map(|p| {
                    let resized = resize_area(&crop(p, s, x, y, w, h), w, h, self.side);
                    if flip {
                        flip_horizontal(&resized, self.side)
                    } else {
                        resized
                    }
                })
                .collect();
            jitter(&mut out, rng);
            out
        } else {
            let offset = (s - self.side) / 2;
            planes
                .iter()
                .map(|p| crop(p, s, offset, offset, self.side, self.side))
                .collect()
        };
        for (c, plane) in planes.iter_mut().enumerate() {
            for v in plane.iter_mut() {
                *v = (*v - self.mean[c]) / self.std[c];
            }
        }
        planes.concat()
    }

    /// The file `bytes` as the model reads it at evaluation (decoded, resized,
    /// centre-cropped, normalised), e.g. for `melora adapt`.
    pub fn prepare_for_evaluation(&self, bytes: &[u8], name: &str) -> Result<Vec<f32>> {
        let evaluation = Self {
            augment: false,
            ..self.clone()
        };
        // The centre crop draws nothing from the generator.
        Ok(evaluation.view(
            &self.decode(bytes, name)?,
            &mut ChaCha8Rng::seed_from_u64(0),
        ))
    }
}

/// The generator of a batch's augmentations: a function of `seed` and the picked
/// `(class, example)` pairs, so that the same episode is augmented the same way
/// on every run and platform, and different episodes differently.
pub(crate) fn picks_rng(seed: u64, picks: &[(usize, usize)]) -> ChaCha8Rng {
    // splitmix64's finaliser folded over the picks: cheap, and stable across Rust
    // versions (std's hashers promise neither).
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut h = mix(seed ^ 0x9e37_79b9_7f4a_7c15);
    for &(c, i) in picks {
        h = mix(h ^ c as u64).wrapping_add(mix(i as u64 ^ 0x5851_f42d_4c95_7f2d));
    }
    ChaCha8Rng::seed_from_u64(h)
}

/// `(x, y, width, height)` of torchvision's `RandomResizedCrop` in a `side × side`
/// image: area 8–100% of the image, aspect ratio log-uniform in [3/4, 4/3], ten
/// tries, else the whole image.
fn random_resized_crop(side: usize, rng: &mut ChaCha8Rng) -> (usize, usize, usize, usize) {
    let area = (side * side) as f64;
    let (log_lo, log_hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    for _ in 0..10 {
        let target = area * rng.random_range(0.08..=1.0);
        let ratio = rng.random_range(log_lo..=log_hi).exp();
        let w = (target * ratio).sqrt().round() as usize;
        let h = (target / ratio).sqrt().round() as usize;
        if (1..=side).contains(&w) && (1..=side).contains(&h) {
            let x = rng.random_range(0..=side - w);
            let y = rng.random_range(0..=side - h);
            return (x, y, w, h);
        }
    }
    (0, 0, side, side)
}

/// The `w × h` window at `(x, y)` of a row-major plane `side` wide.
fn crop(plane: &[f32], side: usize, x: usize, y: usize, w: usize, h: usize) -> Vec<f32> {
    (y..y + h)
        .flat_map(|row| plane[row * side + x..row * side + x + w].iter().copied())
        .collect()
}

fn flip_horizontal(plane: &[f32], side: usize) -> Vec<f32> {
    plane
        .chunks(side)
        .flat_map(|row| row.iter().rev().copied())
        .collect()
}

/// PIL's `ImageEnhance` brightness, contrast and colour (saturation) as the FS-CT
/// reference's `ImageJitter` applies them: each with a factor 1 + U(−0.4, 0.4), in
/// random order, clamped to [0, 1]. Saturation does nothing to a grey image.
fn jitter(planes: &mut [Vec<f32>], rng: &mut ChaCha8Rng) {
    #[derive(Clone, Copy)]
    enum Enhance {
        Brightness,
        Contrast,
        Saturation,
    }
    let mut order = [Enhance::Brightness, Enhance::Contrast, Enhance::Saturation];
    order.shuffle(rng);
    for enhance in order {
        let alpha = 1.0 + rng.random_range(-JITTER..=JITTER);
        let grey = luminance(planes);
        match enhance {
            // Blend with black.
            Enhance::Brightness => planes.iter_mut().flatten().for_each(|v| *v *= alpha),
            // Blend with the mean grey level.
            Enhance::Contrast => {
                let mean = grey.iter().sum::<f32>() / grey.len().max(1) as f32;
                planes
                    .iter_mut()
                    .flatten()
                    .for_each(|v| *v = mean + alpha * (*v - mean));
            }
            // Blend with the grey version of the image.
            Enhance::Saturation => {
                for plane in planes.iter_mut() {
                    for (v, g) in plane.iter_mut().zip(&grey) {
                        *v = g + alpha * (*v - g);
                    }
                }
            }
        }
        planes
            .iter_mut()
            .flatten()
            .for_each(|v| *v = v.clamp(0.0, 1.0));
    }
}

/// ITU-R 601-2 luma of RGB planes (PIL's `convert("L")`); a grey plane itself.
fn luminance(planes: &[Vec<f32>]) -> Vec<f32> {
    match planes {
        [r, g, b] => r
            .iter()
            .zip(g)
            .zip(b)
            .map(|((r, g), b)| 0.299 * r + 0.587 * g + 0.114 * b)
            .collect(),
        _ => planes[0].clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transform(channels: usize, side: usize, augment: bool) -> PhotoTransform {
        PhotoTransform {
            channels,
            stored_side: (side as f64 * EVAL_RESIZE) as usize,
            side,
            mean: vec![0.0; channels],
            std: vec![1.0; channels],
            augment,
        }
    }

    #[test]
    fn evaluation_view_is_the_centre_crop_normalised() {
        let t = PhotoTransform {
            mean: vec![0.5],
            std: vec![0.25],
            ..transform(1, 20, false)
        };
        assert_eq!(t.stored_side, 23);
        let stored: Vec<u8> = (0..23 * 23).map(|i| (i % 23) as u8).collect();
        let view = t.view(&stored, &mut ChaCha8Rng::seed_from_u64(1));
        assert_eq!(view.len(), 400);
        // Column x of the view is column x + 1 of the stored image (offset ⌊3/2⌋).
        for (x, v) in view.iter().take(20).enumerate() {
            let expected = ((x + 1) as f32 / 255.0 - 0.5) / 0.25;
            assert!((v - expected).abs() < 1e-6, "{x}: {v} vs {expected}");
        }
    }

    #[test]
    fn augmentation_is_seeded_varied_and_in_range() {
        let t = transform(3, 16, true);
        let stored: Vec<u8> = (0..t.stored_bytes()).map(|i| (i * 7 % 256) as u8).collect();
        let a = t.view(&stored, &mut picks_rng(3, &[(0, 1), (2, 5)]));
        let b = t.view(&stored, &mut picks_rng(3, &[(0, 1), (2, 5)]));
        let c = t.view(&stored, &mut picks_rng(3, &[(0, 2), (2, 5)]));
        assert_eq!(a.len(), 3 * 16 * 16);
        assert_eq!(a, b, "same seed and picks, same augmentation");
        assert_ne!(a, c, "other picks, other augmentation");
        assert!(a.iter().all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn crops_stay_inside_the_image() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for _ in 0..2000 {
            let (x, y, w, h) = random_resized_crop(19, &mut rng);
            assert!(w >= 1 && h >= 1 && x + w <= 19 && y + h <= 19);
            let area = (w * h) as f64 / 361.0;
            assert!(area > 0.05, "area {area}");
        }
    }

    #[test]
    fn jitter_of_a_grey_level_keeps_it_grey() {
        // Saturation leaves a grey pixel grey; brightness and contrast scale all
        // channels alike.
        let mut planes = vec![vec![0.3, 0.6]; 3];
        jitter(&mut planes, &mut ChaCha8Rng::seed_from_u64(4));
        assert!((planes[0][0] - planes[1][0]).abs() < 1e-6);
        assert!((planes[1][1] - planes[2][1]).abs() < 1e-6);
    }

    /// `image` encoded as `format` in memory.
    fn encoded(image: image::RgbImage, format: image::ImageFormat) -> Vec<u8> {
        let mut bytes = std::io::Cursor::new(Vec::new());
        image.write_to(&mut bytes, format).unwrap();
        bytes.into_inner()
    }

    #[test]
    fn decoding_resizes_any_shape_to_the_cache_in_the_configured_colour() {
        // Left half red, right half blue, 40 × 20: resized to the square cache.
        let image = image::RgbImage::from_fn(40, 20, |x, _| {
            if x < 20 {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([0, 0, 255])
            }
        });
        let png = encoded(image.clone(), image::ImageFormat::Png);
        let rgb = transform(3, 20, false);
        let stored = rgb.decode(&png, "x.png").unwrap();
        assert_eq!(stored.len(), rgb.stored_bytes());
        let s = rgb.stored_side;
        let at = |c: usize, y: usize, x: usize| stored[c * s * s + y * s + x];
        assert_eq!((at(0, 3, 0), at(1, 3, 0), at(2, 3, 0)), (255, 0, 0));
        assert_eq!((at(0, 9, s - 1), at(2, 9, s - 1)), (0, 255));
        // Grey: ITU-R 601 luma of red is 0.299 · 255.
        let grey = transform(1, 20, false).decode(&png, "x.png").unwrap();
        assert!((i32::from(grey[0]) - 76).abs() <= 1, "{}", grey[0]);
        // JPEG is lossy: close to the colours, not equal.
        let jpeg = encoded(image, image::ImageFormat::Jpeg);
        let lossy = rgb.decode(&jpeg, "x.jpg").unwrap();
        assert!(lossy[3 * s] > 230 && lossy[2 * s * s + 3 * s] < 40);
        let err = rgb
            .decode(&jpeg[..jpeg.len() / 3], "cut.jpg")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cut.jpg") && err.contains("not a readable"),
            "{err}"
        );
    }

    #[test]
    fn flip_reverses_each_row() {
        assert_eq!(
            flip_horizontal(&[1.0, 2.0, 3.0, 4.0], 2),
            vec![2.0, 1.0, 4.0, 3.0]
        );
    }
}
