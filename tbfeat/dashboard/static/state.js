// The view's state lives in the address, so that a view can be shared or bookmarked.
// Inside TensorBoard the address is the top page's: `#tbfeat&run=...&steps=1,5,10`, in
// the `#<dashboard>&key=value` form TensorBoard's own dashboards use; opened alone, the
// page's own.
const KEYS = ['view', 'run', 'runB', 'image', 'steps', 'stages', 'mode', 'alpha', 'stage',
  'channel', 'drift'];

function host() {
  try {
    if (window.parent !== window && window.parent.location.href) return window.parent;
  } catch (e) { /* another origin: keep the state in this page's own address */ }
  return window;
}

function parts() {
  const hash = host().location.hash.replace(/^#/, '');
  return hash ? hash.split('&') : [];
}

export function read() {
  const state = {};
  for (const part of parts()) {
    const at = part.indexOf('=');
    if (at < 0) continue;
    const key = decodeURIComponent(part.slice(0, at));
    if (KEYS.includes(key)) state[key] = decodeURIComponent(part.slice(at + 1));
  }
  return state;
}

export function write(state) {
  const kept = parts().filter((p) => {
    const at = p.indexOf('=');
    return at < 0 ? true : !KEYS.includes(decodeURIComponent(p.slice(0, at)));
  });
  for (const key of KEYS) {
    const value = state[key];
    if (value === undefined || value === null || value === '') continue;
    kept.push(`${encodeURIComponent(key)}=${encodeURIComponent(value)}`);
  }
  const win = host();
  const address = new URL(win.location.href);
  address.hash = kept.join('&');
  if (address.href !== win.location.href) {
    win.history.replaceState(win.history.state, '', address.href);
  }
}

export const list = (text) => (text ? String(text).split(',').filter((s) => s !== '') : []);
export const ints = (text) => list(text).map(Number).filter(Number.isInteger);
