//! Source images for image-to-image, inpainting and outpainting.
//!
//! What a client sends is checked before a pixel is decoded — its bytes, its type (PNG, JPEG
//! or WebP, by content, whatever it is called) and the dimensions its header declares — and
//! decoded under an allocation limit, so a small file that claims a huge canvas is refused,
//! not expanded. The image is then brought to the job's canvas by one rule:
//!
//! - **Scale to cover, crop the centre.** The image is scaled (Lanczos) by the smallest factor
//!   that covers the target area, keeping its aspect ratio, and the overhang is cut equally
//!   from both sides. A mask follows the same path (it must have the image's dimensions) and
//!   is thresholded at half: white (128 and above) is repainted, black is kept.
//! - **Outpainting** (`outpaint` of `left`, `right`, `up`, `down` pixels) puts the image,
//!   fitted as above, inside the canvas with those margins; the margins are repainted (and
//!   start from the image's edge pixels stretched outwards), the image's own area is kept
//!   except where a mask says otherwise.
//! - **The size**, when the request names none, follows the source: its aspect ratio at the
//!   model's default number of pixels, sides rounded to multiples of 8, margins added.
//!
//! The result is stored (sealed) with the job as one PNG: RGB, or RGBA whose alpha is the
//! mask inverted (opaque = kept), at exactly the job's size; workers read it back with
//! [`SourcePixels::from_png`].

use crate::{ErrorCode, Limits, RequestError};
use image::{DynamicImage, GenericImageView, GrayImage, ImageFormat, RgbImage, RgbaImage};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Cursor;

/// Pixels added around the source image, which the model paints in.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(deny_unknown_fields, default)]
pub struct Outpaint {
    pub left: u32,
    pub right: u32,
    pub up: u32,
    pub down: u32,
}

impl Outpaint {
    pub fn is_empty(&self) -> bool {
        *self == Outpaint::default()
    }

    fn across(&self) -> u32 {
        self.left.saturating_add(self.right)
    }

    fn along(&self) -> u32 {
        self.up.saturating_add(self.down)
    }
}

/// A decoded, bounded source image and its mask, as a client sent them.
#[derive(Clone)]
pub struct Source {
    image: RgbImage,
    /// 255 where the model paints, 0 where the image is kept.
    mask: Option<GrayImage>,
    /// A digest of the bytes as sent, for idempotency.
    digest: [u8; 32],
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("width", &self.image.width())
            .field("height", &self.image.height())
            .field("masked", &self.mask.is_some())
            .finish()
    }
}

/// What validation needs to know of a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceFacts {
    pub width: u32,
    pub height: u32,
    pub masked: bool,
}

fn refuse(param: &'static str, message: String) -> RequestError {
    RequestError::new(ErrorCode::InvalidImage, Some(param), message)
}

/// Decodes one uploaded image, refusing anything outside the limits before decoding it.
fn decode_bounded(
    param: &'static str,
    bytes: &[u8],
    limits: &Limits,
) -> Result<DynamicImage, RequestError> {
    if bytes.is_empty() {
        return Err(refuse(param, format!("{param} is empty")));
    }
    if bytes.len() > limits.max_source_bytes {
        return Err(refuse(
            param,
            format!(
                "{param} is {} bytes; at most {} are accepted",
                bytes.len(),
                limits.max_source_bytes
            ),
        ));
    }
    let format = match image::guess_format(bytes) {
        Ok(f @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP)) => f,
        Ok(other) => {
            return Err(refuse(
                param,
                format!(
                    "{param} is {}; it must be PNG, JPEG or WebP",
                    other.to_mime_type()
                ),
            ))
        }
        Err(_) => {
            return Err(refuse(
                param,
                format!("{param} is not an image; it must be PNG, JPEG or WebP"),
            ))
        }
    };
    let undecodable = |e: image::ImageError| refuse(param, format!("{param} cannot be read: {e}"));
    let (width, height) = image::ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(undecodable)?;
    let side = limits.max_source_side;
    if width == 0 || height == 0 || width > side || height > side {
        return Err(refuse(
            param,
            format!("{param} is {width}x{height}; each side must be 1 to {side} pixels"),
        ));
    }
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    let mut bounds = image::Limits::default();
    bounds.max_image_width = Some(side);
    bounds.max_image_height = Some(side);
    // The declared canvas in RGBA16, with room for the decoder's own buffers: what the
    // header promised, never what a crafted stream might ask for later.
    bounds.max_alloc = Some(u64::from(width) * u64::from(height) * 8 + (16 << 20));
    reader.limits(bounds);
    reader.decode().map_err(undecodable)
}

/// An uploaded mask, which must have its image's dimensions.
fn decode_mask(
    bytes: &[u8],
    (width, height): (u32, u32),
    limits: &Limits,
) -> Result<DynamicImage, RequestError> {
    let mask = decode_bounded("mask", bytes, limits)?;
    if mask.dimensions() != (width, height) {
        return Err(refuse(
            "mask",
            format!(
                "the mask is {}x{}; it must have the image's dimensions, {width}x{height}",
                mask.width(),
                mask.height()
            ),
        ));
    }
    Ok(mask)
}

impl Source {
    /// An uploaded image, and a mask (white repainted, black kept) of the same dimensions.
    pub fn decode(
        image: &[u8],
        mask: Option<&[u8]>,
        limits: &Limits,
    ) -> Result<Source, RequestError> {
        let decoded = decode_bounded("image", image, limits)?.to_rgb8();
        let mask_bytes = mask;
        let mask = match mask {
            None => None,
            Some(bytes) => {
                let mask = decode_mask(bytes, decoded.dimensions(), limits)?;
                Some(threshold(&mask.to_luma8(), |v| v >= 128))
            }
        };
        Ok(Source {
            image: decoded,
            mask,
            digest: [0; 32],
        }
        .with_digest_of(image, mask_bytes))
    }

    /// OpenAI's edit convention: the areas where `mask` (or, without one, the image itself)
    /// is fully transparent are repainted. An image with no transparency anywhere is
    /// image-to-image.
    pub fn decode_transparent(
        image: &[u8],
        mask: Option<&[u8]>,
        limits: &Limits,
    ) -> Result<Source, RequestError> {
        let decoded = decode_bounded("image", image, limits)?;
        let holes = match mask {
            Some(bytes) => {
                let mask = decode_mask(bytes, decoded.dimensions(), limits)?;
                if !mask.color().has_alpha() {
                    return Err(refuse(
                        "mask",
                        "the mask has no alpha channel; its fully transparent areas are the ones edited".into(),
                    ));
                }
                mask.to_rgba8()
            }
            None => decoded.to_rgba8(),
        };
        let alpha = GrayImage::from_fn(holes.width(), holes.height(), |x, y| {
            image::Luma([holes.get_pixel(x, y)[3]])
        });
        let repaint = threshold(&alpha, |a| a == 0);
        let any = repaint.pixels().any(|p| p[0] != 0);
        Ok(Source {
            image: decoded.to_rgb8(),
            mask: any.then_some(repaint),
            digest: [0; 32],
        }
        .with_digest_of(image, mask))
    }

    /// A source stored by [`Source::fit`], read back (a re-roll of a job that had one).
    pub fn from_stored(png: &[u8]) -> Result<Source, String> {
        let decoded = image::load_from_memory_with_format(png, ImageFormat::Png)
            .map_err(|e| format!("the stored source image cannot be read: {e}"))?;
        let mask = decoded.color().has_alpha().then(|| {
            let rgba = decoded.to_rgba8();
            GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
                image::Luma([255 - rgba.get_pixel(x, y)[3]])
            })
        });
        Ok(Source {
            image: decoded.to_rgb8(),
            mask,
            digest: [0; 32],
        }
        .with_digest_of(png, None))
    }

    fn with_digest_of(mut self, image: &[u8], mask: Option<&[u8]>) -> Source {
        let mut hash = Sha256::new();
        hash.update(Sha256::digest(image));
        if let Some(mask) = mask {
            hash.update(Sha256::digest(mask));
        }
        self.digest = hash.finalize().into();
        self
    }

    /// What validation needs: the dimensions, and whether anything is repainted.
    pub fn facts(&self, outpaint: &Outpaint) -> SourceFacts {
        SourceFacts {
            width: self.image.width(),
            height: self.image.height(),
            masked: self.mask.is_some() || !outpaint.is_empty(),
        }
    }

    /// A digest of the bytes as sent, hex.
    pub fn digest(&self) -> String {
        hex::encode(self.digest)
    }

    /// The source on the job's canvas of `width × height` (see the module's rule), as the PNG
    /// the job stores. `outpaint`'s margins must leave room (validation checks it).
    pub fn fit(&self, width: u32, height: u32, outpaint: &Outpaint) -> Vec<u8> {
        let inner_w = width.saturating_sub(outpaint.across()).max(1);
        let inner_h = height.saturating_sub(outpaint.along()).max(1);
        let image = cover(
            &DynamicImage::ImageRgb8(self.image.clone()),
            inner_w,
            inner_h,
        )
        .to_rgb8();
        let mask = self.mask.as_ref().map(|m| {
            threshold(
                &cover(&DynamicImage::ImageLuma8(m.clone()), inner_w, inner_h).to_luma8(),
                |v| v >= 128,
            )
        });
        let masked = mask.is_some() || !outpaint.is_empty();
        let mut canvas = RgbaImage::new(width, height);
        for (x, y, pixel) in canvas.enumerate_pixels_mut() {
            // The nearest pixel of the image: itself inside, its edge stretched outside.
            let ix = x.saturating_sub(outpaint.left).min(inner_w - 1);
            let iy = y.saturating_sub(outpaint.up).min(inner_h - 1);
            let inside = x >= outpaint.left
                && x < outpaint.left + inner_w
                && y >= outpaint.up
                && y < outpaint.up + inner_h;
            let repaint = !inside || mask.as_ref().is_some_and(|m| m.get_pixel(ix, iy)[0] != 0);
            let [r, g, b] = image.get_pixel(ix, iy).0;
            *pixel = image::Rgba([r, g, b, if repaint { 0 } else { 255 }]);
        }
        let mut png = Vec::new();
        let written = if masked {
            DynamicImage::ImageRgba8(canvas).write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
        } else {
            DynamicImage::ImageRgba8(canvas)
                .to_rgb8()
                .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
        };
        // Encoding to memory fails only on an allocation failure.
        written.expect("a PNG encodes into memory");
        png
    }
}

/// The canvas size a request without `size` gets: the source's aspect ratio at about
/// `area` pixels (the model's default), sides multiples of 8 within `min..=max`, margins
/// included.
pub fn natural_size(
    facts: &SourceFacts,
    outpaint: &Outpaint,
    area: u64,
    min_side: u32,
    max_side: u32,
) -> (u32, u32) {
    let scale = (area as f64 / (f64::from(facts.width) * f64::from(facts.height))).sqrt();
    let side = |source: u32, margins: u32| {
        let wanted = f64::from(source) * scale + f64::from(margins);
        let rounded = ((wanted / 8.0).round() as u32).saturating_mul(8);
        rounded.clamp(min_side.div_ceil(8) * 8, max_side / 8 * 8)
    };
    (
        side(facts.width, outpaint.across()),
        side(facts.height, outpaint.along()),
    )
}

/// The image scaled to cover `width × height`, its overhang cut equally from both sides:
/// the centred box of the canvas's aspect ratio is cut from the source first, then scaled,
/// so no step is larger than the source or the canvas (a 1×4096 strip brought to 1024²
/// scales one pixel, not a 1024×4194304 stretch).
fn cover(image: &DynamicImage, width: u32, height: u32) -> DynamicImage {
    if image.dimensions() == (width, height) {
        return image.clone();
    }
    let (sw, sh) = (u64::from(image.width()), u64::from(image.height()));
    let (w, h) = (u64::from(width), u64::from(height));
    let (cw, ch) = if sw * h > sh * w {
        ((sh * w / h).clamp(1, sw), sh)
    } else {
        (sw, (sw * h / w).clamp(1, sh))
    };
    // Both within the source's sides, which are u32.
    let (cw, ch) = (cw as u32, ch as u32);
    image
        .crop_imm((image.width() - cw) / 2, (image.height() - ch) / 2, cw, ch)
        .resize_exact(width, height, image::imageops::FilterType::Lanczos3)
}

fn threshold(image: &GrayImage, repaint: impl Fn(u8) -> bool) -> GrayImage {
    GrayImage::from_fn(image.width(), image.height(), |x, y| {
        image::Luma([if repaint(image.get_pixel(x, y)[0]) {
            255
        } else {
            0
        }])
    })
}

/// A stored source's pixels, as the engine takes them.
#[derive(Clone, PartialEq)]
pub struct SourcePixels {
    /// RGB8, row-major.
    pub rgb: Vec<u8>,
    /// One byte per pixel, 255 repainted and 0 kept; `None` for image-to-image.
    pub mask: Option<Vec<u8>>,
}

impl std::fmt::Debug for SourcePixels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourcePixels")
            .field("rgb_bytes", &self.rgb.len())
            .field("masked", &self.mask.is_some())
            .finish()
    }
}

impl SourcePixels {
    /// Reads the PNG [`Source::fit`] stored, which must be `width × height` and masked as the
    /// job says.
    pub fn from_png(png: &[u8], width: u32, height: u32, masked: bool) -> Result<Self, String> {
        let mut reader = image::ImageReader::with_format(Cursor::new(png), ImageFormat::Png);
        let mut bounds = image::Limits::default();
        bounds.max_image_width = Some(width);
        bounds.max_image_height = Some(height);
        reader.limits(bounds);
        let decoded = reader
            .decode()
            .map_err(|e| format!("the job's source image cannot be read: {e}"))?;
        if decoded.dimensions() != (width, height) {
            return Err(format!(
                "the job's source image is {}x{}, not the job's {width}x{height}",
                decoded.width(),
                decoded.height()
            ));
        }
        if decoded.color().has_alpha() != masked {
            return Err("the job's source image does not carry the mask the job asks for".into());
        }
        let mask = masked.then(|| {
            decoded
                .to_rgba8()
                .pixels()
                .map(|p| if p[3] < 128 { 255 } else { 0 })
                .collect()
        });
        Ok(SourcePixels {
            rgb: decoded.to_rgb8().into_raw(),
            mask,
        })
    }
}

#[cfg(test)]
mod tests;
