//! Fitting a result's images into the attachment size Discord allows one message.
//!
//! Discord tells every interaction how large an attachment its response may carry; one
//! message carries all of a job's images, so their sizes are added up. When the stored PNGs
//! are too large, cheaper encodings are tried in order — the same pixels recompressed, then
//! JPEG at falling quality — each applied to every image of the message alike. When even the
//! smallest does not fit, the message carries as many images as fit (the first ones, at the
//! best encoding that fits them) and the rest are left to the API. Only copies are
//! re-encoded: the stored image stays PNG.

use sparkle_discord::Attachment;

/// Discord's attachment limit when the interaction did not say.
pub const DEFAULT_ATTACHMENT_LIMIT: u64 = 10 * 1024 * 1024;

/// JPEG qualities tried, best first; below the last one images are not worth sending.
const JPEG_QUALITIES: [u8; 8] = [90, 80, 70, 60, 50, 40, 30, 20];

/// A stored image: its PNG bytes and the name to send it under, without the extension.
#[derive(Debug, Clone)]
pub struct StoredImage {
    pub stem: String,
    pub png: Vec<u8>,
}

/// How the attached images are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// The stored PNG, unchanged.
    Stored,
    /// The same pixels and text chunks as a smaller PNG.
    Recompressed,
    /// JPEG at this quality (1–100).
    Jpeg { quality: u8 },
}

impl Encoding {
    fn all() -> impl Iterator<Item = Encoding> {
        [Encoding::Stored, Encoding::Recompressed]
            .into_iter()
            .chain(JPEG_QUALITIES.map(|quality| Encoding::Jpeg { quality }))
    }
}

/// What goes into the message.
#[derive(Debug, Clone)]
pub struct Fitted {
    /// The first `attachments.len()` images, in order.
    pub attachments: Vec<Attachment>,
    pub encoding: Encoding,
    /// Images that did not fit (the last ones).
    pub left_out: usize,
}

impl Fitted {
    pub fn total_bytes(&self) -> u64 {
        self.attachments.iter().map(|a| a.bytes.len() as u64).sum()
    }
}

/// The most images, at the best encoding, whose sizes add up to at most `limit` bytes.
/// CPU-bound when re-encoding: run it off the async runtime.
pub fn fit(images: &[StoredImage], limit: u64) -> Fitted {
    let mut encoded: Vec<Encoded> = images.iter().map(Encoded::new).collect();
    for count in (1..=images.len()).rev() {
        for encoding in Encoding::all() {
            let mut total = 0u64;
            let mut fits = true;
            for image in &mut encoded[..count] {
                match image.size(encoding) {
                    Some(size) if total + size <= limit => total += size,
                    _ => {
                        fits = false;
                        break;
                    }
                }
            }
            if fits {
                let attachments = encoded[..count]
                    .iter_mut()
                    .filter_map(|image| image.attachment(encoding))
                    .collect();
                return Fitted {
                    attachments,
                    encoding,
                    left_out: images.len() - count,
                };
            }
        }
    }
    Fitted {
        attachments: Vec::new(),
        encoding: Encoding::Stored,
        left_out: images.len(),
    }
}

/// One image and the encodings of it made so far (each made at most once).
struct Encoded<'a> {
    stored: &'a StoredImage,
    /// `None` until decoded; `Some(None)` when the PNG cannot be decoded.
    pixels: Option<Option<Pixels>>,
    made: Vec<(Encoding, Option<Vec<u8>>)>,
}

impl<'a> Encoded<'a> {
    fn new(stored: &'a StoredImage) -> Self {
        Encoded {
            stored,
            pixels: None,
            made: Vec::new(),
        }
    }

    fn size(&mut self, encoding: Encoding) -> Option<u64> {
        if encoding == Encoding::Stored {
            return Some(self.stored.png.len() as u64);
        }
        self.bytes(encoding).map(|b| b.len() as u64)
    }

    fn bytes(&mut self, encoding: Encoding) -> Option<&[u8]> {
        if encoding == Encoding::Stored {
            return Some(&self.stored.png);
        }
        let index = match self.made.iter().position(|(e, _)| *e == encoding) {
            Some(index) => index,
            None => {
                let stem = &self.stored.stem;
                let pixels = self.pixels.get_or_insert_with(|| {
                    Pixels::decode(&self.stored.png)
                        .inspect_err(|e| {
                            tracing::warn!(image = %stem, error = %e, "cannot decode a stored PNG to re-encode it")
                        })
                        .ok()
                });
                let bytes = pixels.as_ref().and_then(|p| match encoding {
                    Encoding::Stored => None,
                    Encoding::Recompressed => p.png(),
                    Encoding::Jpeg { quality } => p.jpeg(quality),
                });
                self.made.push((encoding, bytes));
                self.made.len() - 1
            }
        };
        self.made[index].1.as_deref()
    }

    fn attachment(&mut self, encoding: Encoding) -> Option<Attachment> {
        let stem = self.stored.stem.clone();
        let bytes = self.bytes(encoding)?.to_vec();
        Some(match encoding {
            Encoding::Stored | Encoding::Recompressed => {
                Attachment::png(format!("{stem}.png"), bytes)
            }
            Encoding::Jpeg { .. } => Attachment::jpeg(format!("{stem}.jpg"), bytes),
        })
    }
}

/// A decoded image, 8 bits a channel, with the PNG's text chunks.
struct Pixels {
    width: u32,
    height: u32,
    color: png::ColorType,
    data: Vec<u8>,
    /// Recompressing would lose precision (16-bit samples).
    lossy_to_recompress: bool,
    /// tEXt chunks, and zTXt/iTXt ones as text.
    latin1_text: Vec<(String, String)>,
    utf8_text: Vec<(String, String)>,
}

impl Pixels {
    fn decode(bytes: &[u8]) -> Result<Pixels, png::DecodingError> {
        let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        decoder.set_transformations(png::Transformations::normalize_to_color8());
        let mut reader = decoder.read_info()?;
        let mut data = vec![0; reader.output_buffer_size()];
        let frame = reader.next_frame(&mut data)?;
        data.truncate(frame.buffer_size());
        let info = reader.info();
        let latin1_text = info
            .uncompressed_latin1_text
            .iter()
            .map(|t| (t.keyword.clone(), t.text.clone()))
            .collect();
        let mut utf8_text = Vec::new();
        for t in &info.compressed_latin1_text {
            utf8_text.push((t.keyword.clone(), t.get_text()?));
        }
        for t in &info.utf8_text {
            utf8_text.push((t.keyword.clone(), t.get_text()?));
        }
        Ok(Pixels {
            width: frame.width,
            height: frame.height,
            color: frame.color_type,
            data,
            lossy_to_recompress: info.bit_depth == png::BitDepth::Sixteen,
            latin1_text,
            utf8_text,
        })
    }

    /// The same pixels and text, compressed as hard as the encoder can.
    fn png(&self) -> Option<Vec<u8>> {
        if self.lossy_to_recompress {
            return None;
        }
        let mut out = Vec::new();
        let result = (|| -> Result<(), png::EncodingError> {
            let mut encoder = png::Encoder::new(&mut out, self.width, self.height);
            encoder.set_color(self.color);
            encoder.set_depth(png::BitDepth::Eight);
            encoder.set_compression(png::Compression::Best);
            encoder.set_adaptive_filter(png::AdaptiveFilterType::Adaptive);
            for (keyword, text) in &self.latin1_text {
                encoder.add_text_chunk(keyword.clone(), text.clone())?;
            }
            for (keyword, text) in &self.utf8_text {
                encoder.add_itxt_chunk(keyword.clone(), text.clone())?;
            }
            let mut writer = encoder.write_header()?;
            writer.write_image_data(&self.data)?;
            writer.finish()
        })();
        result
            .inspect_err(|e| tracing::warn!(error = %e, "cannot recompress a PNG"))
            .ok()
            .map(|()| out)
    }

    /// A baseline JPEG (alpha dropped).
    fn jpeg(&self, quality: u8) -> Option<Vec<u8>> {
        let (Ok(width), Ok(height)) = (u16::try_from(self.width), u16::try_from(self.height))
        else {
            return None;
        };
        let (data, color) = match self.color {
            png::ColorType::Rgb => (self.data.clone(), jpeg_encoder::ColorType::Rgb),
            png::ColorType::Rgba => (self.data.clone(), jpeg_encoder::ColorType::Rgba),
            png::ColorType::Grayscale => (self.data.clone(), jpeg_encoder::ColorType::Luma),
            png::ColorType::GrayscaleAlpha => (
                self.data.iter().step_by(2).copied().collect(),
                jpeg_encoder::ColorType::Luma,
            ),
            // normalize_to_color8 expands palettes, so none reach here.
            png::ColorType::Indexed => return None,
        };
        let mut out = Vec::new();
        let mut encoder = jpeg_encoder::Encoder::new(&mut out, quality);
        encoder.set_optimized_huffman_tables(true);
        encoder
            .encode(&data, width, height, color)
            .inspect_err(|e| tracing::warn!(error = %e, "cannot encode a JPEG"))
            .ok()
            .map(|()| out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PNG of `width`×`height`, noisy or smooth, stored with light compression as a
    /// generator in a hurry would, with a `parameters` chunk.
    fn png_of(width: u32, height: u32, noisy: bool, seed: u32) -> Vec<u8> {
        let mut state = seed.wrapping_mul(2_654_435_761).max(1);
        let mut data = Vec::new();
        for y in 0..height {
            for x in 0..width {
                for c in 0..3u32 {
                    let smooth = (x * 3 + y * 2 + c * 40) as u8;
                    let value = if noisy {
                        state ^= state << 13;
                        state ^= state >> 17;
                        state ^= state << 5;
                        smooth.wrapping_add((state % 64) as u8)
                    } else {
                        smooth
                    };
                    data.push(value);
                }
            }
        }
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_compression(png::Compression::Fast);
        encoder.set_filter(png::FilterType::NoFilter);
        encoder
            .add_text_chunk("parameters".into(), format!("a corgi\nSeed: {seed}"))
            .expect("text");
        let mut writer = encoder.write_header().expect("header");
        writer.write_image_data(&data).expect("data");
        writer.finish().expect("finish");
        out
    }

    fn stored(count: u32, noisy: bool) -> Vec<StoredImage> {
        (0..count)
            .map(|i| StoredImage {
                stem: format!("sparkle-{i}"),
                png: png_of(64, 64, noisy, i + 1),
            })
            .collect()
    }

    fn total(images: &[StoredImage]) -> u64 {
        images.iter().map(|i| i.png.len() as u64).sum()
    }

    fn pixels(png: &[u8]) -> Vec<u8> {
        Pixels::decode(png).expect("decode").data
    }

    #[test]
    fn images_that_fit_go_as_stored() {
        let images = stored(2, true);
        let fitted = fit(&images, total(&images));
        assert_eq!(fitted.encoding, Encoding::Stored);
        assert_eq!(fitted.left_out, 0);
        assert_eq!(fitted.attachments.len(), 2);
        for (a, s) in fitted.attachments.iter().zip(&images) {
            assert_eq!(a.bytes, s.png);
            assert_eq!(
                (a.filename.as_str(), a.content_type),
                (&*format!("{}.png", s.stem), "image/png")
            );
        }
    }

    #[test]
    fn a_cheaper_png_with_the_same_pixels_and_parameters_comes_first() {
        let images = stored(1, false);
        let fitted = fit(&images, total(&images) - 1);
        assert_eq!(fitted.encoding, Encoding::Recompressed);
        let png = &fitted.attachments[0].bytes;
        assert!(png.len() < images[0].png.len());
        assert_eq!(pixels(png), pixels(&images[0].png), "lossless");
        let decoded = Pixels::decode(png).expect("decode");
        assert_eq!(
            decoded.latin1_text,
            [("parameters".to_string(), "a corgi\nSeed: 1".to_string())]
        );
    }

    #[test]
    fn jpeg_quality_falls_until_every_image_fits() {
        let images = stored(2, true);
        let recompressed: u64 = images
            .iter()
            .map(|i| {
                Pixels::decode(&i.png)
                    .expect("decode")
                    .png()
                    .expect("png")
                    .len() as u64
            })
            .sum();
        let mut last_quality = 100;
        for limit in [
            recompressed - 1,
            recompressed / 2,
            recompressed / 4,
            recompressed / 6,
        ] {
            let fitted = fit(&images, limit);
            let Encoding::Jpeg { quality } = fitted.encoding else {
                panic!("limit {limit}: {:?}", fitted.encoding);
            };
            assert!(quality <= last_quality, "limit {limit}");
            last_quality = quality;
            assert_eq!(fitted.left_out, 0, "limit {limit}");
            assert!(fitted.total_bytes() <= limit);
            for (a, s) in fitted.attachments.iter().zip(&images) {
                assert!(a.bytes.starts_with(&[0xFF, 0xD8, 0xFF]), "a JPEG");
                assert_eq!(a.filename, format!("{}.jpg", s.stem));
                assert_eq!(a.content_type, "image/jpeg");
            }
        }
        assert!(
            last_quality < 90,
            "the smallest limit needed a lower quality"
        );
    }

    #[test]
    fn as_many_images_as_fit_are_attached_and_the_rest_left_out() {
        let images = stored(4, true);
        let jpeg_20: Vec<u64> = images
            .iter()
            .map(|i| {
                let p = Pixels::decode(&i.png).expect("decode");
                p.jpeg(20).expect("jpeg").len() as u64
            })
            .collect();
        let fitted = fit(&images, jpeg_20[0] + 1);
        assert_eq!((fitted.attachments.len(), fitted.left_out), (1, 3));
        assert_eq!(fitted.attachments[0].filename, "sparkle-0.jpg");
        // More images at a lower quality rather than fewer at a higher one.
        let fitted = fit(&images, jpeg_20[0] + jpeg_20[1] + 1);
        assert_eq!((fitted.attachments.len(), fitted.left_out), (2, 2));
        assert_eq!(fitted.encoding, Encoding::Jpeg { quality: 20 });
        assert_eq!(fitted.attachments[1].filename, "sparkle-1.jpg");
    }

    #[test]
    fn nothing_that_fits_nothing_attached_and_never_over_the_limit() {
        let images = stored(3, true);
        let fitted = fit(&images, 100);
        assert!(fitted.attachments.is_empty());
        assert_eq!(fitted.left_out, 3);
        for limit in (0..total(&images) + 100).step_by(997) {
            let fitted = fit(&images, limit);
            assert!(fitted.total_bytes() <= limit, "limit {limit}");
            assert_eq!(fitted.attachments.len() + fitted.left_out, 3);
        }
        assert_eq!(fit(&[], 0).left_out, 0);
    }

    #[test]
    fn an_undecodable_image_goes_as_stored_or_not_at_all() {
        let broken = vec![StoredImage {
            stem: "broken".into(),
            png: b"\x89PNG\r\n\x1a\nnot really".to_vec(),
        }];
        assert_eq!(fit(&broken, 1_000).attachments.len(), 1);
        let fitted = fit(&broken, 5);
        assert_eq!((fitted.attachments.len(), fitted.left_out), (0, 1));
    }

    #[test]
    fn grey_and_transparent_images_encode_too() {
        for (color, channels) in [
            (png::ColorType::Grayscale, 1),
            (png::ColorType::GrayscaleAlpha, 2),
            (png::ColorType::Rgba, 4),
        ] {
            let mut out = Vec::new();
            let mut encoder = png::Encoder::new(&mut out, 16, 16);
            encoder.set_color(color);
            let mut writer = encoder.write_header().expect("header");
            writer
                .write_image_data(&vec![128u8; 16 * 16 * channels])
                .expect("data");
            writer.finish().expect("finish");
            let p = Pixels::decode(&out).expect("decode");
            let jpeg = p.jpeg(50).expect("jpeg");
            assert!(jpeg.starts_with(&[0xFF, 0xD8, 0xFF]), "{color:?}");
        }
    }
}
