// Channel over time: one channel of one stage at every step, as a strip of tiles cut
// from the logged grids (the tile route crops the PNG where the run's layout puts it).
import * as api from './api.js';
import {el} from './dom.js';

export async function renderChannel(app, main) {
  const s = app.state;
  const info = await app.info(s.run);
  const channel = Number(s.channel);
  if (!s.stage || !info.grids.includes(s.stage) || !Number.isInteger(channel)) {
    main.append(el('p', {class: 'note'},
      'Click a tile of a grid in Compare to follow that channel over every step.'));
    return;
  }
  const tag = api.tags.features(s.stage, s.image);
  const steps = info.steps.features;
  main.append(el('div', {class: 'controls'},
    el('b', {id: 'channel-title'}, `${s.stage} · channel ${channel} · ${s.image}`),
    el('span', {class: 'hint'}, `${steps.length} steps`),
    el('button', {onclick: () => app.set({view: 'compare', stages: s.stage})},
      'back to Compare')));
  const strip = el('div', {class: 'strip', id: 'strip'});
  for (const step of steps) {
    const img = el('img', {class: 'tile', loading: 'lazy', alt: `step ${step}`,
      dataset: {run: s.run, tag, step, channel}, src: api.tileUrl(s.run, tag, step, channel)});
    img.onerror = () => img.replaceWith(el('div', {class: 'missing tile'}, '–'));
    strip.append(el('figure', {dataset: {step}}, img, el('figcaption', {}, String(step))));
  }
  main.append(strip);
}
