// Drift map: every stage (rows, forward order) at every step (columns), coloured by its
// drift, live from the run's drift scalars. Hover shows the value; a click opens Compare
// on that stage at the step before, the step, and the first step.
import * as api from './api.js';
import {el, heat, short} from './dom.js';

export async function renderDrift(app, main) {
  const s = app.state;
  const drift = await api.json('drift', {run: s.run});
  if (!drift.bases.length) {
    main.append(el('p', {class: 'note'}, `run ${s.run} has no drift yet: it needs two steps.`));
    return;
  }
  const values = drift[s.drift];
  const top = Math.max(1e-12, ...values.flat().filter((v) => v !== null));
  const readout = el('div', {class: 'readout', id: 'readout'}, 'hover a cell');
  main.append(el('div', {class: 'controls'},
    ['delta', 'first'].map((k) => el('button', {
      class: k === s.drift ? 'mode active' : 'mode', dataset: {drift: k},
      onclick: () => app.set({drift: k}),
    }, k === 'delta' ? 'against the step before' : 'against the first step')),
    el('span', {class: 'hint'}, `colour: 0 to ${short(top)}`), readout));
  const map = el('div', {class: 'driftmap', id: 'driftmap',
    style: {gridTemplateColumns: `max-content repeat(${drift.steps.length}, minmax(3px, 1fr))`}});
  drift.bases.forEach((base, i) => {
    map.append(el('div', {class: 'label'}, base));
    drift.steps.forEach((step, j) => {
      const v = values[i][j];
      const text = `${base} · step ${step} · drift ${short(v)}`;
      map.append(el('div', {
        class: v === null ? 'dcell empty' : 'dcell', title: text,
        dataset: {base, step, value: v === null ? '' : v},
        style: v === null ? {} : {background: heat(v / top)},
        onmouseenter: () => { readout.textContent = text; },
        onclick: () => openStep(app, drift, base, j),
      }));
    });
  });
  main.append(map);
}

function openStep(app, drift, base, j) {
  const logged = app.infos.get(app.state.run).steps.all;
  const t = drift.steps[j];
  const before = logged.filter((x) => x < t);
  const steps = [logged[0], before[before.length - 1], t]
    .filter((x) => x !== undefined && logged.includes(x));
  app.set({view: 'compare', stages: base,
    steps: [...new Set(steps)].sort((a, b) => a - b).join(',')});
}
