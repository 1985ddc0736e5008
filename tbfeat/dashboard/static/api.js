// The dashboard's requests: every URL is built here, relative to the plugin's routes
// (data/plugin/tbfeat/), whether the page is TensorBoard's iframe or opened alone.
const BASE = new URL('../', import.meta.url);

export function url(route, params = {}) {
  const u = new URL(route, BASE);
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null) u.searchParams.set(key, String(value));
  }
  return u.href;
}

export async function json(route, params = {}) {
  const response = await fetch(url(route, params));
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `${route}: HTTP ${response.status}`);
  return body;
}

export const tags = {
  features: (base, image) => `features/${base}/${image}`,
  cam: (base, image) => `cam/${base}/${image}`,
  input: (image) => `input/${image}`,
};

export const imageUrl = (run, tag, step) => url('image', {run, tag, step});
export const tileUrl = (run, tag, step, channel) => url('tile', {run, tag, step, channel});
export const figureUrl = (run, kind, stage, image, steps) =>
  url('figure', {run, kind, stage, image, steps: steps.join(',')});

// Loads an <img> and resolves once it is decoded (rejects if the route answered 400).
export function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error(`not loaded: ${src}`));
    img.src = src;
  });
}
